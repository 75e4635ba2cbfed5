"""The repository's Dockerfile built and run with podman (tests/packaging/test_image.py).

podman, mmdebstrap and runc are hard requirements under CI (`.ci/install-image-tools`
installs them): when they, or a base image, are missing the tests fail there and skip
elsewhere. A failing `podman build` fails everywhere: that is the Dockerfile's own fault.

Two machine problems are handled here and only here (never in the Dockerfile or the chart):

- **No container registry.** When the Dockerfile's base (`python:3.11.11-slim-bookworm`) is
  neither present nor pullable, a stand-in is imported under its exact name: Debian's
  minbase of the same release (mmdebstrap) with `python3 -m venv /usr/local`, so that
  /usr/local/bin/python and pip are where the official image has them, and with this
  machine's CA bundle (package downloads may pass a TLS-intercepting proxy) which pip is
  pointed at (`PIP_CERT`). The stand-in carries the label `STAND_IN_LABEL`: the next run
  tries the real base again first, and reports which one it built on.
- **No CAP_SYS_RESOURCE.** podman asks the OCI runtime to raise RLIMIT_NOFILE/RLIMIT_NPROC
  above the hard limits conmon runs with; without that capability runc fails ("error
  setting rlimits"). Only when a trivial `podman run` fails that way, containers run with
  `--runtime` set to a wrapper (written to the session's temp directory) that deletes the
  rlimits from the OCI spec and execs the real runtime: the container keeps conmon's limits.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from packaging.requirements import Requirement

__all__ = [
    "IMAGE",
    "OWNER_LABEL",
    "STAND_IN_LABEL",
    "BaseImage",
    "Build",
    "Container",
    "Podman",
    "announce",
    "build_image",
    "dockerfile_args",
    "dockerfile_bases",
    "image_differences",
    "outside",
    "podman",
    "reap_leftovers",
    "runtime_options",
    "unavailable",
]

IMAGE = "localhost/auth-sidecar:test"  # kept between runs: a rebuild is then ~1 s of cache
BUILD_STAGE_IMAGE = "localhost/auth-sidecar:test-build"  # the wheel stage: cache, not dangling
STAND_IN_LABEL = "io.auth-sidecar.test.stand-in"  # on a base made by `_import_stand_in`
OWNER_LABEL = "io.auth-sidecar.test.owner"  # pid of the pytest process that ran a container
PULL_TIMEOUT = 90.0  # a registry that hangs must not hang the suite (unreachable: fails fast)
BUILD_TIMEOUT = 900.0
STAND_IN_TIMEOUT = 900.0
_LOCK = Path("/var/tmp/auth-sidecar-image-test.lock")  # one build at a time on a machine
_MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")
_INSTALL_HINT = "run .ci/install-image-tools as root"


def unavailable(reason: str) -> NoReturn:
    """A tool or base image is missing: a failure under CI, a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it ({_INSTALL_HINT})", pytrace=False)
    pytest.skip(f"{reason} ({_INSTALL_HINT}); CI requires it")


def announce(config: pytest.Config, line: str) -> None:
    """Print `line` on the terminal even while pytest captures output (timings, sizes)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n[image] {line}", flush=True)


# --- podman -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Podman:
    binary: str

    def run(
        self, *args: str, timeout: float = 120.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(
                [self.binary, *args], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"podman {' '.join(args)}: no answer in {timeout:g}s") from exc
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}{done.stdout}"
            )
        return done

    def image_id(self, name: str) -> str | None:
        done = self.run("image", "inspect", "--format", "{{.Id}}", name)
        return done.stdout.strip() if done.returncode == 0 else None

    def labels(self, name: str) -> dict[str, str]:
        done = self.run("image", "inspect", "--format", "{{json .Labels}}", name, check=True)
        return dict(json.loads(done.stdout) or {})

    def size_mb(self, name: str) -> float:
        done = self.run("image", "inspect", "--format", "{{.Size}}", name, check=True)
        return int(done.stdout) / 1e6

    def runtime_path(self) -> str:
        done = self.run("info", "--format", "{{.Host.OCIRuntime.Path}}", check=True)
        return done.stdout.strip()


def podman() -> Podman:
    """The podman command; missing, it fails under CI and skips elsewhere."""
    binary = shutil.which("podman")
    if binary is None:
        unavailable("podman is not installed")
    if os.geteuid() != 0:
        unavailable("the image tests run root podman (rootless needs uidmap, slirp4netns …)")
    return Podman(binary)


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Two test sessions on one machine build (and retag) one after the other."""
    with _LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- the Dockerfile ---------------------------------------------------------------------------


def _from_lines(dockerfile: Path) -> list[tuple[str, str | None]]:
    """(image, stage name) of each FROM, in order."""
    out = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = [w for w in line.split() if not w.startswith("--platform")]
        if words and words[0].upper() == "FROM":
            name = words[3] if len(words) >= 4 and words[2].upper() == "AS" else None
            out.append((words[1], name))
    return out


def dockerfile_bases(dockerfile: Path) -> list[str]:
    """The external images the Dockerfile builds FROM (not its own earlier stages)."""
    stages: set[str] = set()
    bases: list[str] = []
    for image, name in _from_lines(dockerfile):
        if image not in stages and image not in bases:
            bases.append(image)
        if name:
            stages.add(name)
    return bases


def dockerfile_args(dockerfile: Path) -> dict[str, str | None]:
    """Each ARG and its default (None: none, so a build would need `--build-arg`)."""
    args: dict[str, str | None] = {}
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = line.split(maxsplit=1)
        if len(words) == 2 and words[0].upper() == "ARG":
            name, sep, default = words[1].strip().partition("=")
            args[name] = default if sep else None
    return args


def _qualified(image: str) -> str:
    """Docker's normalisation: `python:3.11` is docker.io/library/python:3.11."""
    first, slash, _ = image.partition("/")
    if not slash:
        return "docker.io/library/" + image
    if "." in first or ":" in first or first == "localhost":
        return image
    return "docker.io/" + image


# --- the base image ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseImage:
    name: str
    stand_in: bool
    how: str  # for the report: "present", "pulled", "stand-in …"


def _ensure_base(pm: Podman, image: str, workdir: Path) -> BaseImage:
    """`image` in local storage: the real one if present or pullable, else the stand-in."""
    name = _qualified(image)
    old = pm.image_id(name)
    if old is not None and STAND_IN_LABEL not in pm.labels(name):
        return BaseImage(name, stand_in=False, how="present")
    try:
        pull = pm.run("pull", "--quiet", name, timeout=PULL_TIMEOUT)
        pulled, why = pull.returncode == 0, pull.stderr.strip()[-160:]
    except AssertionError as exc:  # timed out
        pulled, why = False, str(exc)
    if pulled:
        if old is not None and old != pm.image_id(name):
            pm.run("rmi", old)  # the stand-in it replaces
        return BaseImage(name, stand_in=False, how="pulled")
    if old is not None:
        return BaseImage(name, stand_in=True, how=f"stand-in (real base not pullable: {why})")
    started = time.monotonic()
    _import_stand_in(pm, name, workdir)
    took = time.monotonic() - started
    return BaseImage(name, stand_in=True, how=f"stand-in made in {took:.1f}s ({why})")


def _host_ca_bundle() -> Path | None:
    """The CA bundle this machine's pip and Python trust (a TLS-intercepting proxy's CA)."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _import_stand_in(pm: Podman, name: str, workdir: Path) -> None:
    """Debian minbase + python3 as a venv at /usr/local, imported under `name`."""
    match = re.search(r"-(bookworm|bullseye|trixie)$", name)
    if match is None:
        unavailable(f"{name} cannot be pulled and there is no Debian stand-in for it")
    suite = match.group(1)
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        unavailable(f"{name} cannot be pulled and mmdebstrap (for a stand-in) is not installed")
    tar = workdir / "stand-in.tar"
    command = [
        mmdebstrap,
        "--quiet",
        "--variant=minbase",
        "--include=python3,python3-venv,ca-certificates",
        # What a slim image leaves out anyway; it also keeps the tarball small.
        *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
        '--customize-hook=chroot "$1" python3 -m venv /usr/local',
    ]
    if _MERGED_USR_HOOK.is_dir():  # usr-is-merged instead of usrmerge (which pulls in perl)
        command.append(f"--hook-dir={_MERGED_USR_HOOK}")
    changes = [
        "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
        f"LABEL {STAND_IN_LABEL}=mmdebstrap-{suite}-minbase-python3-venv",
    ]
    ca = _host_ca_bundle()
    if ca is not None:
        command.append(f"--customize-hook=upload {ca} /etc/ssl/certs/ca-certificates.crt")
        changes.append("ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
    command += [suite, str(tar)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=STAND_IN_TIMEOUT)
        if done.returncode != 0:
            unavailable(f"{name} cannot be pulled and mmdebstrap failed:\n{done.stderr[-3000:]}")
        change_args = [arg for change in changes for arg in ("--change", change)]
        pm.run("import", "--quiet", *change_args, str(tar), name, timeout=300, check=True)
    finally:
        tar.unlink(missing_ok=True)


# --- the build --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    image: str
    image_id: str
    seconds: float  # every `podman build` of the session together
    size_mb: float
    base: BaseImage
    command: tuple[str, ...]  # the build, as run (first time)
    cache: str  # for the report: how the layer cache was used
    differences: list[str]  # between the image's sidecar package and the tree's (none!)
    run_options: list[str]  # what `podman run` needs on this machine (`runtime_options`)
    runtime: str  # why


def build_image(pm: Podman, context: Path, workdir: Path) -> Build:
    """`podman build` of `context`/Dockerfile as a user runs it: no --build-arg, no changes.

    The layer cache makes a rebuild take a second, but podman 4.3's buildah (1.28) reuses a
    cached `RUN --mount=type=bind,from=build` layer even when the build stage changed
    (containers/buildah#4522, fixed in 1.29): the image would keep the previous wheels. So
    the image's `sidecar` package and requirements are compared with the tree's, and on a
    difference the image is built again with `--no-cache`.

    The final image is tagged `IMAGE` and the first stage's `BUILD_STAGE_IMAGE` (it is the
    cache of `pip wheel`: tagged, it is no dangling image); the images those tags pointed to
    before, made stale by a change of the sources, are removed with their layers.
    """
    dockerfile = context / "Dockerfile"
    bases = dockerfile_bases(dockerfile)
    stages = len(_from_lines(dockerfile))
    with _machine_lock():
        base = None
        for image in bases:
            base = _ensure_base(pm, image, workdir)
        assert base is not None, "the Dockerfile has no FROM"
        run_options, runtime = runtime_options(pm, base.name, workdir)
        before = {tag: pm.image_id(tag) for tag in (IMAGE, BUILD_STAGE_IMAGE)}
        # --network=host: RUN steps reach the package index without CNI; --pull=never: the
        # base was settled above. Both change how podman runs the build, not the Dockerfile.
        command = ("build", "--network=host", "--pull=never", "-f", str(dockerfile))
        started = time.monotonic()
        builds = [_build(pm, base, *command, "-t", IMAGE, str(context))]
        differences = image_differences(pm, run_options, context)
        cache = "layer cache" if before[IMAGE] else "no earlier image"
        if differences:
            cache = f"stale cache ({differences[0]}…): rebuilt with --no-cache"
            builds.append(_build(pm, base, *command, "--no-cache", "-t", IMAGE, str(context)))
            differences = image_differences(pm, run_options, context)
        seconds = time.monotonic() - started
        stage_images = [_first_stage_image(b.stdout) for b in builds] if stages > 1 else []
        if stage_images and stage_images[-1]:  # the wheel stage, tagged: it is no dangling image
            pm.run("tag", stage_images[-1], BUILD_STAGE_IMAGE)
        # What earlier builds (and a stale first build of this one) left: removed with their
        # layers; refused, and so kept, while a container uses one.
        keep = {pm.image_id(IMAGE), pm.image_id(BUILD_STAGE_IMAGE)}
        stale = [*before.values(), *(pm.image_id(s) for s in stage_images[:-1] if s)]
        for old in dict.fromkeys(stale):
            if old is not None and old not in keep:
                pm.run("rmi", old)
        image_id = pm.image_id(IMAGE)
        assert image_id is not None
        return Build(
            image=IMAGE,
            image_id=image_id,
            seconds=seconds,
            size_mb=pm.size_mb(IMAGE),
            base=base,
            command=(pm.binary, *command, "-t", IMAGE, str(context)),
            cache=cache,
            differences=differences,
            run_options=run_options,
            runtime=runtime,
        )


def _build(pm: Podman, base: BaseImage, *args: str) -> subprocess.CompletedProcess[str]:
    done = pm.run(*args, timeout=BUILD_TIMEOUT)
    if done.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed (exit {done.returncode}) on the {base.how} base:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


# What the image holds: its `sidecar` package's .py files (sha256) and the requirements of the
# installed distribution (without extras), as JSON.
_CONTENTS = """
import hashlib, importlib.metadata, json, pathlib, sidecar
root = pathlib.Path(sidecar.__file__).parent
print(json.dumps({
    "files": {
        p.relative_to(root.parent).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*.py") if "__pycache__" not in p.parts
    },
    "requires": importlib.metadata.requires("auth-sidecar") or [],
}))
"""


def _requirements(lines: list[str]) -> set[str]:
    """Normalised requirements, without the extras' (`; extra == "test"`)."""
    found = (Requirement(line) for line in lines)
    return {str(r) for r in found if r.marker is None or "extra" not in str(r.marker)}


def run_python(
    pm: Podman, run_options: list[str], script: str, image: str = IMAGE
) -> subprocess.CompletedProcess[str]:
    """`python -c script` in a throwaway container of `image`, offline."""
    return pm.run(
        "run",
        *run_options,
        "--rm",
        "--pull=never",
        "--network=none",
        "--entrypoint",
        "python",
        image,
        "-c",
        script,
    )


def image_differences(pm: Podman, run_options: list[str], context: Path) -> list[str]:
    """How the image's sidecar differs from the tree's: files and requirements."""
    done = run_python(pm, run_options, _CONTENTS)
    if done.returncode != 0:
        return [f"no sidecar package in the image: {done.stderr.strip()[-500:]}"]
    image = json.loads(done.stdout)
    tree = {
        p.relative_to(context).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (context / "sidecar").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    project = tomllib.loads((context / "pyproject.toml").read_text())["project"]
    differences = [
        f"{path} differs"
        for path in sorted(tree)
        if image["files"].get(path, tree[path]) != tree[path]
    ]
    differences += [
        f"{path} missing in the image" for path in sorted(set(tree) - set(image["files"]))
    ]
    differences += [f"{path} only in the image" for path in sorted(set(image["files"]) - set(tree))]
    wanted, got = _requirements(project["dependencies"]), _requirements(image["requires"])
    if wanted != got:
        differences.append(f"requirements {sorted(got ^ wanted)} differ")
    return differences


def _first_stage_image(output: str) -> str | None:
    """The image the first stage of a multi-stage build ended with, from `podman build`'s
    output: the last `--> <id>` before the second stage's first step (`[2/N] STEP 1/M`)."""
    image = None
    for line in output.splitlines():
        if re.match(r"\[2/\d+\] STEP 1/", line):
            return image
        match = re.fullmatch(r"--> ([0-9a-f]{6,64})", line.strip())
        if match:
            image = match.group(1)
    return None


# --- running containers -----------------------------------------------------------------------

_WRAPPER = '''\
#!{python} -I
"""OCI runtime {runtime} without process rlimits (tests/support/containers.py).

podman asks for RLIMIT_NOFILE/RLIMIT_NPROC above the hard limits it runs with, which needs
CAP_SYS_RESOURCE; without the rlimits in the spec the container keeps conmon's limits.
"""
import json
import os
import sys

RUNTIME = {runtime!r}


def strip(path, *keys):
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return
    node = spec
    for key in keys[:-1]:
        node = node.get(key) or {{}}
    if node.pop(keys[-1], None) is not None:
        with open(path, "w") as f:
            json.dump(spec, f)


args = sys.argv[1:]
for i, arg in enumerate(args):
    value = args[i + 1] if i + 1 < len(args) else ""
    if arg in ("--bundle", "-b"):
        strip(os.path.join(value, "config.json"), "process", "rlimits")
    elif arg.startswith("--bundle="):
        strip(os.path.join(arg.partition("=")[2], "config.json"), "process", "rlimits")
    elif arg in ("--process", "-p"):
        strip(value, "rlimits")
os.execv(RUNTIME, [RUNTIME, *args])
'''


def runtime_options(pm: Podman, image: str, workdir: Path) -> tuple[list[str], str]:
    """`podman run` options this machine needs, and why: none, or `--runtime <wrapper>`."""

    def probe(*options: str) -> subprocess.CompletedProcess[str]:
        return pm.run(
            "run", *options, "--rm", "--pull=never", "--network=host", "--entrypoint", "true", image
        )

    first = probe()
    if first.returncode == 0:
        return [], "plain podman run"
    if "rlimit" not in first.stderr:
        unavailable(f"podman cannot run a container here:\n{first.stderr}")
    wrapper = workdir / "runtime-without-rlimits"
    wrapper.write_text(_WRAPPER.format(python=sys.executable, runtime=pm.runtime_path()))
    wrapper.chmod(0o755)
    options = ["--runtime", str(wrapper)]
    second = probe(*options)
    if second.returncode != 0:
        unavailable(f"podman cannot run a container here, even without rlimits:\n{second.stderr}")
    why = re.search(r"error setting rlimit type \d+: [^:]+", first.stderr)
    return options, f"a runtime without rlimits ({why.group(0) if why else 'rlimits'})"


def reap_leftovers(pm: Podman) -> None:
    """Remove the containers of test sessions that died without cleaning up."""
    done = pm.run(
        "ps",
        "--all",
        "--filter",
        f"label={OWNER_LABEL}",
        "--format",
        '{{.ID}} {{index .Labels "' + OWNER_LABEL + '"}}',
    )
    for line in done.stdout.splitlines():
        cid, _, owner = line.partition(" ")
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            pm.run("rm", "--force", "--volumes", "--time", "0", cid)


@dataclass
class Container:
    """One container of `image`, started detached; its log goes to `log_path`."""

    pm: Podman
    image: str
    name: str
    options: list[str]
    log_path: Path

    def start(self) -> None:
        done = self.pm.run(
            "run",
            "--detach",
            "--pull=never",
            "--name",
            self.name,
            "--label",
            f"{OWNER_LABEL}={os.getpid()}",
            "--log-driver",
            "k8s-file",
            "--log-opt",
            f"path={self.log_path}",
            *self.options,
            self.image,
        )
        if done.returncode != 0:
            raise AssertionError(f"podman run failed:\n{done.stderr}\n{self.logs()}")

    def logs(self) -> str:
        """The container's output lines (the k8s-file log without its prefixes)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line.split(" ", 3)[-1] for line in lines)

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return self.pm.run("exec", self.name, *command)

    def inspect(self) -> dict[str, Any]:
        done = self.pm.run("container", "inspect", self.name, check=True)
        (data,) = json.loads(done.stdout)
        return dict(data)

    def diff(self) -> list[tuple[str, str]]:
        """`podman diff`: (A|C|D, path) of every change to the image's filesystem."""
        done = self.pm.run("diff", self.name, check=True)
        return [(line[0], line[2:]) for line in done.stdout.splitlines() if line.strip()]

    def remove(self) -> None:
        """Stopped at once if still running, and removed with any volume (none is expected)."""
        self.pm.run("rm", "--ignore", "--force", "--volumes", "--time", "0", self.name)


def outside(changes: list[tuple[str, str]], allowed: list[str]) -> list[tuple[str, str]]:
    """The changes neither at or under an `allowed` path, nor a directory above one that only
    changed (C) because something was mounted inside it."""

    def under(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip("/") + "/")

    return [
        (kind, path)
        for kind, path in changes
        if not any(under(path, root) for root in allowed)
        and not (kind == "C" and any(under(root, path) for root in allowed))
    ]
