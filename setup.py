"""The native pieces: the enclave's own fault handler (src/constmig/enclave/_wtrack.c: write tracking,
and the Access Tracker's guard serving accesses its checks miss) and the native data plane
(src/constmig/native/_engine.c, AES-256-GCM through the system's libcrypto).

Everything else is in pyproject.toml. Where no C compiler (or no OpenSSL headers) is at hand the package
still installs; the Access Tracker's pre-copy then says that its write tracker was not built
(constmig.enclave.dirty), its figures say why escaped accesses are not served (untracked_unserved: they
crash the enclave, never read zeros), and constmig.native says why the engine is missing (the Python
path runs).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler: install without the handler, say so
            print(f"warning: constmig's native extensions were not built ({e})")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"warning: constmig's native extension {ext.name} was not built ({e})")


setup(
    ext_modules=[Extension("constmig.enclave._wtrack", ["src/constmig/enclave/_wtrack.c"],
                           extra_compile_args=["-O2", "-Wall", "-Werror"]),
                 Extension("constmig.native._engine", ["src/constmig/native/_engine.c"], libraries=["crypto"],
                           extra_compile_args=["-O2", "-Wall", "-Werror"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
