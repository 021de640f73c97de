#!/usr/bin/env python
"""Create (or reuse) fpn_plugin's development environment; run by ``make setup``.

Two layers, so that fresh clones (CI's among them) do not download ~5 GB each time:

1. A *base* virtualenv in a per-user cache, keyed by a hash of everything that decides its
   contents (the pinned requirements, these scripts, the Python version). It holds torch,
   torchvision, Detectron2 and the other dependencies. It is built once per key and marked
   complete only after a final check passes; an unmarked one is deleted and rebuilt.
2. ``.venv`` in the checkout: a thin virtualenv that sees the base environment's packages
   (through a ``.pth`` file) and holds the editable install of this checkout, so two clones
   never import each other's code. ``.venv/bin/python`` is the interpreter to use.

If the interpreter running this script already imports torch (a GPU machine's image, a GPU
user's environment), the set-up runs in *host mode*: the base environment sees that
interpreter's packages (a ``.pth`` file adds its site folders, which also works when the
interpreter is itself a virtualenv) and only what is missing is installed into it, under a
pip constraints file that pins every distribution the interpreter has to its installed version:
torch, torchvision and numpy are never replaced, shadowed or upgraded. A Detectron2 the
interpreter imports is kept; otherwise the wheel built from the v0.6 sdist is added.

``--wheels DIR`` installs from the wheels in DIR only (``pip --no-index``), for machines without
network (``tools/gpu_check.sh`` carries such a folder); Detectron2 then comes from the
``detectron2-*.whl`` in DIR. ``--dry-run`` only checks that the lock resolves for this
interpreter (a temporary virtualenv and ``pip install --dry-run``; nothing is cached).

Environment variables: ``FPN_PLUGIN_CACHE`` (cache folder, default
``$XDG_CACHE_HOME/fpn_plugin`` or ``~/.cache/fpn_plugin``).
"""
import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_TOOLS = os.path.join(ROOT, "tools", "env")
LOCK_FILE = os.path.join(ROOT, "requirements", "cpu-lock.txt")
VENV = os.path.join(ROOT, ".venv")
COMPLETE_MARK = ".fpn_plugin_env_complete"
SDIST_SPEC = "pb1-detectron2==0.6"
# What fpn_plugin, its tests and the set-up's check need beside torch and Detectron2
# (import name -> distribution); in host mode each is installed only if missing.
HOST_MODE_EXTRAS = {
    "pycocotools": "pycocotools",
    "fvcore": "fvcore",
    "cv2": "opencv-python-headless",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "psutil": "psutil",
    "pytest": "pytest",
    "xdist": "pytest-xdist",
    "pytest_timeout": "pytest-timeout",
    "random_order": "pytest-random-order",
    "hypothesis": "hypothesis",
    "shapely": "shapely",
}
# A version pip accepts in a constraint (PEP 440, local part included); others are left out.
_PEP440 = re.compile(r"^([0-9]+!)?[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?"
                     r"(\+[a-z0-9]+(\.[a-z0-9]+)*)?$", re.IGNORECASE)

CHECK_SCRIPT = r"""
import importlib, sys, torch, torchvision, torchvision.ops as ops
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
assert ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0], "torchvision nms"
out = ops.roi_align(torch.ones(1, 1, 8, 8), [boxes[:1]], output_size=2)
assert out.shape == (1, 1, 2, 2), "torchvision roi_align"
import detectron2, detectron2.modeling, detectron2.layers, detectron2.model_zoo, pycocotools, fvcore, cv2
print("torch", torch.__version__, "torchvision", torchvision.__version__,
      "detectron2", detectron2.__version__, "at", detectron2.__file__)
"""


class SetupError(Exception):
    def __init__(self, step, why, todo):
        super().__init__(f"{step}: {why}")
        self.step, self.why, self.todo = step, why, todo


def log(msg):
    print(f"[setup] {msg}", flush=True)


def cache_root():
    if os.environ.get("FPN_PLUGIN_CACHE"):
        return os.path.abspath(os.environ["FPN_PLUGIN_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "fpn_plugin")


def existing_detectron2():
    """Location of a Detectron2 importable by this interpreter, or None."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def normalize(name):
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


class Host:
    """What the interpreter running the set-up already has (host mode), or None."""

    def __init__(self, site_dirs, constraints, detectron2):
        self.site_dirs = site_dirs  # folders the base environment adds with site.addsitedir
        self.constraints = constraints  # "name==version" of every installed distribution
        self.detectron2 = detectron2  # where Detectron2 is, or None

    @staticmethod
    def detect():
        if importlib.util.find_spec("torch") is None:
            return None
        dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
        if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
            dirs.append(site.getusersitepackages())
        pins = {}
        for dist in importlib.metadata.distributions():
            name, version = dist.metadata["Name"], dist.version
            if name and version and _PEP440.match(version):
                pins.setdefault(normalize(name), version)
        return Host(dirs, sorted(f"{n}=={v}" for n, v in pins.items()), existing_detectron2())

    def has(self, module):
        return importlib.util.find_spec(module) is not None

    def describe(self):
        versions = dict(c.split("==") for c in self.constraints)
        return ", ".join(f"{n} {versions[n]}" for n in ("torch", "torchvision", "numpy", "pillow")
                         if n in versions)


def env_key(host, wheels):
    digest = hashlib.sha256()
    for path in (LOCK_FILE, __file__, os.path.join(ENV_TOOLS, "build_detectron2_wheel.py"),
                 os.path.join(ENV_TOOLS, "detectron2_c_placeholder.py")):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(sys.version.encode())
    digest.update(platform.machine().encode())
    digest.update(sys.executable.encode())
    if host is not None:  # a change of the interpreter's packages gives a new environment
        digest.update(repr((host.site_dirs, host.constraints, host.detectron2)).encode())
    if wheels:
        digest.update(repr(sorted(os.listdir(wheels))).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_step(step, cmd, logfile, todo, **kwargs):
    log(f"{step} ...")
    start = time.time()
    with open(logfile, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if proc.returncode != 0:
        with open(logfile) as f:
            tail = "".join(f.readlines()[-15:])
        raise SetupError(step, f"`{' '.join(cmd)}` exited with {proc.returncode}; last lines "
                         f"of {logfile}:\n{tail}", todo)
    log(f"{step}: done in {time.time() - start:.0f} s")


def pip_source_args(wheels):
    """pip arguments that restrict installs to the folder ``wheels`` (None: the registry)."""
    return ["--no-index", "--find-links", wheels] if wheels else []


def create_venv(base, logfile, with_pip=True):
    """A virtualenv at ``base``, with its own pip unless ``with_pip`` is False."""
    cmd = [sys.executable, "-m", "venv", base] + ([] if with_pip else ["--without-pip"])
    run_step("creating the base virtualenv", cmd, logfile,
             "check that this Python has the venv module (Debian: apt-get install python3-venv)")


def build_base_env(base, host, wheels, wheel_cache, logfile):
    net_todo = ("check that PyPI is reachable (pip config list shows the index) and that the "
                "disk holding the cache has ~8 GB free, then run `make setup` again")
    if wheels:
        net_todo = (f"the wheels in {wheels} do not cover what is missing (pip's message above "
                    "names it); add its wheel there (`make gpu-wheels` on a networked machine)")
    # In host mode the interpreter's own pip (seen through the .pth file) installs: a pip and
    # setuptools of the new environment would shadow the interpreter's.
    create_venv(base, logfile, with_pip=host is None or not host.has("pip"))
    py = os.path.join(base, "bin", "python")
    if host is None:
        run_step("installing pinned requirements (torch, torchvision, fvcore, pycocotools, "
                 "opencv, pytest; ~5 GB on a cold cache)",
                 [py, "-m", "pip", "install", *pip_source_args(wheels), "-r", LOCK_FILE],
                 logfile, net_todo)
        d2_wheel = detectron2_wheel(py, wheels, wheel_cache, logfile, net_todo)
        run_step("installing Detectron2 v0.6 (pip package `detectron2`)",
                 [py, "-m", "pip", "install", "--no-deps", "--force-reinstall", d2_wheel],
                 logfile, net_todo)
    else:
        install_into_host_env(py, base, host, wheels, wheel_cache, logfile, net_todo)
    run_step("checking the environment (torchvision ops on CPU, Detectron2 imports)",
             [py, "-c", CHECK_SCRIPT], logfile,
             "the packages installed but do not work together; read the log above, then run "
             "`make clean-env setup` for a clean rebuild")


def install_into_host_env(py, base, host, wheels, wheel_cache, logfile, net_todo):
    base_site = subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    with open(os.path.join(base_site, "_fpn_plugin_host_site.pth"), "w") as f:
        # addsitedir, so the host's own .pth files (editable installs, namespaces) run too.
        f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in host.site_dirs)
                + "\n")
    # Pins of what the interpreter has, less what the new environment holds itself (the pip and
    # setuptools of ensurepip, when the interpreter has no pip) and pip (a tool, see below).
    own = {normalize(d.metadata["Name"]) for d in importlib.metadata.distributions(path=[base_site])}
    own.add("pip")
    constraints = os.path.join(base, "host-constraints.txt")
    with open(constraints, "w") as f:
        f.write("\n".join(c for c in host.constraints if c.split("==")[0] not in own) + "\n")
    log(f"host mode: keeping this interpreter's {host.describe()}; pip may only add packages "
        f"(constraints: {constraints})")
    missing = [dist for mod, dist in HOST_MODE_EXTRAS.items() if not host.has(mod)]
    targets = list(missing)
    if host.detectron2:
        log(f"Detectron2 already importable from {host.detectron2}: keeping it")
    else:
        if not wheels:
            # The sdist's metadata is prepared without build isolation (its setup.py imports
            # torch), which needs setuptools and a pip the lock allows (26.3 refuses the sdist);
            # a pip installed here only shadows the interpreter's inside this environment.
            with open(LOCK_FILE) as f:
                pip_pin = [line.strip() for line in f if line.startswith("pip==")]
            run_step(f"installing {pip_pin[0]} and, if missing, setuptools (to read the "
                     "Detectron2 sdist)",
                     [py, "-m", "pip", "install", "-c", constraints, *pip_pin, "setuptools"],
                     logfile, net_todo)
        targets.insert(0, detectron2_wheel(py, wheels, wheel_cache, logfile, net_todo))
    if targets:
        names = [os.path.basename(t) for t in targets]
        run_step(f"installing what this interpreter lacks ({', '.join(names)} and their "
                 "missing dependencies)",
                 [py, "-m", "pip", "install", *pip_source_args(wheels), "-c", constraints,
                  *targets], logfile, net_todo)
    check_host_torch_kept(py, base_site, host)


def check_host_torch_kept(py, base_site, host):
    """Raise unless torch, torchvision and numpy still come from the host's own folders."""
    out = subprocess.check_output(
        [py, "-c", "import json, importlib.metadata as md, torch, torchvision, numpy; "
         "print(json.dumps({m.__name__: [md.version(m.__name__), m.__file__] "
         "for m in (torch, torchvision, numpy)}))"], text=True)
    pins = dict(c.split("==") for c in host.constraints)
    for name, (version, where) in json.loads(out.strip().splitlines()[-1]).items():
        inside = os.path.realpath(where).startswith(os.path.realpath(base_site) + os.sep)
        if inside or (name in pins and version != pins[name]):
            raise SetupError(f"keeping the interpreter's {name}",
                             f"{name} {version} now loads from {where}, not the interpreter's "
                             f"{name} {pins.get(name)}",
                             "report this as a bug; run `make clean-env` before retrying")


def detectron2_wheel(py, wheels, wheel_cache, logfile, net_todo):
    """Path of the Detectron2 wheel to install: from ``wheels``, else built from the sdist."""
    if wheels:
        found = sorted(w for w in os.listdir(wheels)
                       if w.startswith("detectron2-") and w.endswith(".whl"))
        if len(found) != 1:
            raise SetupError("finding the Detectron2 wheel",
                             f"expected one detectron2-*.whl in {wheels}, found {found}", net_todo)
        return os.path.join(wheels, found[0])
    os.makedirs(wheel_cache, exist_ok=True)
    built = [w for w in os.listdir(wheel_cache) if w.startswith("detectron2-")]
    if not built:
        with tempfile.TemporaryDirectory(prefix="d2sdist-") as tmp:
            # --no-build-isolation: pip prepares the sdist's metadata with the torch just
            # installed (its setup.py imports torch); nothing is compiled here.
            run_step(f"downloading the {SDIST_SPEC} sdist (Detectron2 v0.6 Python code)",
                     [py, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                      "--dest", tmp, SDIST_SPEC], logfile, net_todo)
            sdists = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
            if len(sdists) != 1:
                raise SetupError("downloading the Detectron2 sdist",
                                 f"expected one .tar.gz, pip saved {sdists}", net_todo)
            run_step("building a Detectron2 wheel without the compiled extension, with the "
                     "numpy 2 / Pillow 10 / setuptools 81 substitutions (listed in the log)",
                     [py, os.path.join(ENV_TOOLS, "build_detectron2_wheel.py"),
                      os.path.join(tmp, sdists[0]), wheel_cache], logfile,
                     "read the log above; the sdist must match the pinned sha256")
        built = [w for w in os.listdir(wheel_cache) if w.startswith("detectron2-")]
    return os.path.join(wheel_cache, built[0])


def ensure_base_env(logfile, wheels):
    host = Host.detect()
    key = env_key(host, wheels)
    root = cache_root()
    envs = os.path.join(root, "envs")
    os.makedirs(envs, exist_ok=True)
    name = f"py{sys.version_info[0]}.{sys.version_info[1]}-{key}"
    base = os.path.join(envs, name)
    with file_lock(os.path.join(envs, name + ".lock")):
        mark = os.path.join(base, COMPLETE_MARK)
        if os.path.exists(mark):
            return base, key
        if os.path.exists(base):
            log(f"removing the incomplete environment {base} (an earlier set-up did not finish)")
            shutil.rmtree(base)
        log(f"building the base environment in {base} (log: {logfile})")
        try:
            build_base_env(base, host, wheels, os.path.join(root, "wheels", key), logfile)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)  # never leave a half-built env behind
            raise
        with open(mark, "w") as f:
            json.dump({"key": key, "python": sys.executable,
                       "host_mode": host is not None,
                       "system_detectron2": host.detectron2 if host else None,
                       "built": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    return base, key


def dry_run(logfile):
    """Check that the lock resolves for this interpreter, installing nothing that stays."""
    with tempfile.TemporaryDirectory(prefix="fpn-plugin-dry-run-") as tmp:
        venv = os.path.join(tmp, "venv")
        create_venv(venv, logfile)
        py = os.path.join(venv, "bin", "python")
        with open(LOCK_FILE) as f:
            pip_pin = [line.strip() for line in f if line.startswith("pip==")]
        net_todo = "check that PyPI is reachable (pip config list shows the index)"
        run_step(f"installing the lock's {pip_pin[0]}", [py, "-m", "pip", "install", *pip_pin],
                 logfile, net_todo)
        report = os.path.join(tmp, "report.json")
        run_step(f"resolving {os.path.relpath(LOCK_FILE, ROOT)} for Python "
                 f"{platform.python_version()} (metadata only)",
                 [py, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary",
                  ":all:", "--no-binary", "fvcore,antlr4-python3-runtime",
                  "--report", report, "-r", LOCK_FILE], logfile, net_todo)
        with open(report) as f:
            chosen = {normalize(item["metadata"]["name"]): item["metadata"]["version"]
                      for item in json.load(f)["install"]}
    with open(LOCK_FILE) as f:
        pins = dict(line.strip().split("==") for line in f
                    if "==" in line and not line.startswith("#"))
    pins = {normalize(n): v for n, v in pins.items()}
    wrong = {n: (v, chosen.get(n)) for n, v in pins.items() if chosen.get(n) != v}
    if wrong:
        raise SetupError("checking the resolution", f"pinned vs chosen: {wrong}",
                         "regenerate requirements/cpu-lock.txt (see its header)")
    log(f"the lock resolves for Python {platform.python_version()}: {len(chosen)} distributions")


def checkout_stamp(base, key):
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        setup_hash = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"base": base, "key": key, "setup_py": setup_hash, "root": ROOT}


def ensure_checkout_venv(base, key, logfile):
    stamp_path = os.path.join(VENV, COMPLETE_MARK)
    want = checkout_stamp(base, key)
    with contextlib.suppress(OSError, ValueError):
        with open(stamp_path) as f:
            if json.load(f) == want:
                return
    if os.path.lexists(VENV):
        shutil.rmtree(VENV) if os.path.isdir(VENV) and not os.path.islink(VENV) else os.remove(VENV)
    run_step("creating .venv for this checkout",
             [os.path.join(base, "bin", "python"), "-m", "venv", "--without-pip", VENV], logfile,
             "check that the checkout folder is writable")
    base_site = subprocess.check_output(
        [os.path.join(base, "bin", "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    venv_site = subprocess.check_output(
        [os.path.join(VENV, "bin", "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    with open(os.path.join(venv_site, "_fpn_plugin_base_env.pth"), "w") as f:
        # addsitedir (not a bare path) so the base environment's own .pth files run too.
        f.write(f"import site; site.addsitedir({base_site!r})\n")
    py = os.path.join(VENV, "bin", "python")
    run_step("installing fpn_plugin (editable) into .venv",
             [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT],
             logfile, "read the log above; setup.py may be broken")
    where = subprocess.check_output(
        [py, "-c", "import fpn_plugin, os; print(os.path.dirname(fpn_plugin.__file__))"],
        text=True, cwd="/").strip()
    if os.path.realpath(where) != os.path.realpath(os.path.join(ROOT, "fpn_plugin")):
        raise SetupError("checking the editable install",
                         f".venv imports fpn_plugin from {where}, not from this checkout",
                         "run `make clean-env setup`")
    with open(stamp_path, "w") as f:
        json.dump(want, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", metavar="DIR",
                        help="install only from the wheels in DIR (no network)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only check that the lock resolves for this interpreter")
    args = parser.parse_args()
    wheels = os.path.abspath(args.wheels) if args.wheels else None
    if wheels and not os.path.isdir(wheels):
        parser.error(f"--wheels {args.wheels}: no such folder")
    root = cache_root()
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    logfile = os.path.join(root, "logs", time.strftime("setup-%Y%m%d-%H%M%S.log"))
    try:
        if args.dry_run:
            dry_run(logfile)
            return 0
        base, key = ensure_base_env(logfile, wheels)
        ensure_checkout_venv(base, key, logfile)
    except SetupError as e:
        print(f"\n[setup] FAILED at step: {e.step}\n[setup] why: {e.why}\n"
              f"[setup] what to do: {e.todo}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[setup] interrupted; the partial environment was removed", file=sys.stderr)
        return 130
    log(f"environment ready: {os.path.relpath(VENV)}/bin/python (base: {base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
