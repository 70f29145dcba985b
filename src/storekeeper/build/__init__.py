"""The build layer (between ``store`` and ``daemon``): builds derivations."""
