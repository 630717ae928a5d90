# The single definition of the package version: setup.py parses this file (without importing the
# package, which needs torch and the built extension) and __init__ re-exports it.
__version__ = "0.1.0"
