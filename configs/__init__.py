"""The YAML configs that ship with apexq (package data: ``importlib.resources.files("apexq.configs")``)."""
