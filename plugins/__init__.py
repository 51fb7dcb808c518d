"""Built-in policies of llm-extproc, installed as the ``extproc_plugins`` package.

Each module is one policy, registered through the ``extproc.plugins`` entry-point group declared
in this project's ``pyproject.toml`` — the same way a third-party plugin package registers its own.
"""
