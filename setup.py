"""Build glue: maps protocols/ into edgeos.protocols and compiles ext/*.pyx.

Set EDGEOS_NO_EXTENSIONS=1 for a pure-Python build; otherwise a compile error fails the install,
with a message that says how to get a compiler or the pure build.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

packages = ["edgeos"] + [f"edgeos.{p}" for p in find_packages("edgeos")]
packages += ["edgeos.protocols"] + [f"edgeos.protocols.{p}" for p in find_packages("protocols")]
package_dir = {"edgeos": "edgeos", "edgeos.protocols": "protocols"}
# The systemd unit and sysusers file, shipped inside the package for `edgeos service install`.
packages += ["edgeos.service.systemd"]
# The console's pages, script and style (files, not modules), declared so setuptools ships them
# as data of a package of their own instead of warning about an undeclared one.
packages += ["edgeos.console.static"]
package_dir["edgeos.service.systemd"] = "systemd"

HINT = """
edgeos: compiling the filter kernels and the sync's framing (ext/*.pyx) failed: {error}
  Install a C compiler and the Python headers (Debian: apt install gcc python3-dev) and retry,
  or install the pure-Python kernels, about 100 times slower, with a warning at every start:
  EDGEOS_NO_EXTENSIONS=1 pip install ...
"""


class BuildKernels(build_ext):
    """Turns a missing or failing compiler into a message that names both ways out."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # CompileError, LinkError, PlatformError, OSError: same advice
            raise SystemExit(HINT.format(error=e)) from e


ext_modules = []
if os.environ.get("EDGEOS_NO_EXTENSIONS") != "1":
    import numpy
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [
            Extension(
                "edgeos.filters._kernels",
                ["ext/_kernels.pyx"],
                include_dirs=[numpy.get_include()],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=["-O3", "-ffp-contract=off"],  # twins stay bit-identical
            ),
            # The sync's message assembly (its twin: edgeos/sync/_reference.py).
            Extension("edgeos.sync._frame", ["ext/_frame.pyx"], extra_compile_args=["-O3"]),
        ],
        compiler_directives={"language_level": 3},
    )

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass={"build_ext": BuildKernels})
