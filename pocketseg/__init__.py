"""pocketseg: cascaded Pocket U-Net segmentation of abdominal CT with FLARE 2023 labels."""

__version__ = "0.1.0"


def segment(image, model, **options):
    """Segment one abdominal CT scan with a model package; returns a uint8 nibabel label image.

    ``image`` is a path (NIfTI file or DICOM series folder), a nibabel image or a
    :class:`pocketseg.volume.Volume`; ``model`` is a model package folder. Options:
    ``device`` (auto|cpu|cuda), ``backend`` (auto|tensorrt|onnxruntime|torch),
    ``precision``, ``overlap``, ``gaussian``, ``batch_size``, ``series_uid``,
    ``check_intensities`` (see :func:`pocketseg.runtime.predict.segment`).
    """
    from pocketseg.runtime.predict import segment as _segment

    return _segment(image, model, **options)
