"""The one thing pyproject.toml cannot say: the optional C hot path of the engine.

Without a C compiler and Python headers the build skips it and the engine
answers every call in Python (slower, same behaviour).  ./quickstart installs
gcc and python3-dev.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "axnet.intercept._fastpath",
            sources=["axnet/intercept/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
