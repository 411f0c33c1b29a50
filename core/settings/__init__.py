"""Server settings shared by the plugins that start, serve and reach a server (``serve``,
``client``): the config file and environment (``config.py``) and the options of ``spl serve`` /
``spl server start`` (``options.py``). Not a plugin: a library the plugins import."""
