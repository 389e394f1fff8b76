"""Build yikatong: every .pyx under engine/, ledger/ and protocols/ becomes an extension.

The source folders are mapped into the ``yikatong`` namespace (``engine/`` → ``yikatong.engine``)
so that nothing with a generic name lands in site-packages.

Environment:
  YIKATONG_DEBUG=1   debug build: bounds and wraparound checks, assertions kept, line tracing,
                     -O0 -g. The default build is the fast one (-O3, checks off in the hot loops).
  YIKATONG_PGO=generate|use
                     profile-guided build of the engine's core only (tools/pgo_build.py runs
                     both stages and the training between them; `make build` calls it):
                     `generate` instruments yikatong.engine._core, `use` compiles it with the
                     profile the training wrote to build/pgo. Other extensions are left out of
                     these two builds (they keep the plain build's .so).
"""
import os
import sysconfig
import pathlib

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = pathlib.Path(__file__).parent
DEBUG = os.environ.get("YIKATONG_DEBUG", "") not in ("", "0")
PGO = os.environ.get("YIKATONG_PGO", "")
PGO_MODULE = "yikatong.engine._core"
PGO_DIR = HERE / "build" / "pgo"
if PGO not in ("", "generate", "use") or (PGO and DEBUG):
    raise SystemExit(f"YIKATONG_PGO={PGO!r}: expected 'generate' or 'use', and no YIKATONG_DEBUG")

# folder → package it is installed as (a part not written yet is skipped)
PACKAGES = {
    package: folder for package, folder in {
        "yikatong": "cli",
        "yikatong.engine": "engine",
        "yikatong.ledger": "ledger",
        "yikatong.protocols": "protocols",
    }.items() if (HERE / folder / "__init__.py").exists()
}


def cython_include_tree() -> str:
    """A shadow tree `yikatong/{engine,ledger,protocols}` → the source folders, so that Cython
    finds each module's .pxd under its installed name (yikatong.engine._core) and modules can
    `from yikatong.engine._core cimport Request` across folders."""
    root = HERE / "build" / "cython-include"
    shadow = root / "yikatong"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.pxd").touch()
    for package, folder in PACKAGES.items():
        if package == "yikatong":
            continue
        link = shadow / package.split(".", 1)[1]
        if not os.path.lexists(link):
            link.symlink_to(HERE / folder, target_is_directory=True)
    return str(root)


def extensions():
    include_tree = cython_include_tree()
    exts = []
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if DEBUG:
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
        compile_args = ["-O0", "-g", "-UNDEBUG"]
    else:
        compile_args = ["-O3", "-march=x86-64-v2", "-DNDEBUG"]
        if "clang" not in (os.environ.get("CC") or sysconfig.get_config_var("CC") or ""):
            # gcc expands a fixed-size memset/memcpy of 64–512 bytes (a Result, a Txn, a Wire row
            # cleared per message) into `rep stos`/`rep movs`, whose start-up costs ~30 cycles each
            # on these Xeons; SSE stores in a loop cost a few. Measured in bench/README.md (engine).
            compile_args += ["-mmemset-strategy=vector_loop:512:noalign,libcall:-1:noalign",
                             "-mmemcpy-strategy=vector_loop:512:noalign,libcall:-1:noalign"]
    for package, folder in PACKAGES.items():
        for pyx in sorted((HERE / folder).glob("*.pyx")):
            name = f"{package}.{pyx.stem}"
            extra_args, link_args = [], []
            if PGO:
                if name != PGO_MODULE:
                    continue
                # The profile is found by the object file's absolute path (gcc mangles it into
                # the .gcda name under PGO_DIR): both stages build in the same build/temp.* tree.
                # A profile that does not match the source (edited since) is an error, not a
                # silent plain build: tools/pgo_build.py trains again instead.
                extra_args = ([f"-fprofile-generate={PGO_DIR}", "-fprofile-update=single"]
                              if PGO == "generate" else
                              [f"-fprofile-use={PGO_DIR}", "-Werror=missing-profile",
                               "-Werror=coverage-mismatch"])
                link_args = [f"-fprofile-generate={PGO_DIR}"] if PGO == "generate" else []
            exts.append(
                Extension(
                    name,
                    [str(pyx.relative_to(HERE))],
                    include_dirs=[numpy.get_include(), str(HERE / folder)],
                    define_macros=macros,
                    extra_compile_args=compile_args + extra_args,
                    extra_link_args=link_args,
                    libraries=[line.split(":", 1)[1].strip()
                               for line in pyx.read_text().splitlines()[:20]
                               if line.startswith("# link:")],
                )
            )
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "linetrace": DEBUG,
            "embedsignature": True,
        },
        annotate=bool(os.environ.get("YIKATONG_ANNOTATE")),
        include_path=[include_tree],
    )


setup(
    name="yikatong",
    version="0.1.0",
    description="Engine for the social security card 一卡通: medical settlement, ledger, ISO 8583 server",
    python_requires=">=3.11",
    package_dir=PACKAGES,
    packages=list(PACKAGES) + ["yikatong.commands"],
    package_data={p: ["*.pxd", "*.pyx", "*.h", "sql/*.sql"] for p in PACKAGES},
    ext_modules=extensions(),
    install_requires=[
        "numpy>=1.26",
        "msgspec>=0.18",
        "uvloop>=0.19",
        "lmdb>=1.4",
        "duckdb>=1.0",
        "pyarrow>=14",
    ],
    entry_points={"console_scripts": ["yikatong=yikatong.main:main"]},
    zip_safe=False,
)
