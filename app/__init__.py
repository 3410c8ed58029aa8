"""The application on top: the ``m3t`` command line and the demo, over every package."""
