# The harness plugin is loaded through its pytest11 entry point once the package is
# installed; this makes a bare checkout (not installed) work as well.
import importlib.metadata

if not any(ep.name == "harness" for ep in importlib.metadata.entry_points(group="pytest11")):
    pytest_plugins = ["harness.pytest_plugin"]
