# Native parts: the cffi module (memkv_nixl/_native/build_native.py) and the NIXL plugin
# libplugin_MEMKV.so (memkv_nixl/_native/nixl/build_plugin.py), built with the package.
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildExtWithPlugin(build_ext):
    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location(
            "build_plugin", os.path.join(HERE, "memkv_nixl", "_native", "nixl", "build_plugin.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        base = HERE if self.inplace else self.build_lib
        mod.build(os.path.join(base, "memkv_nixl", "nixl"))


setup(cffi_modules=["memkv_nixl/_native/build_native.py:ffibuilder"],
      cmdclass={"build_ext": BuildExtWithPlugin})
