"""imageqc as a Windows service.

- :mod:`windows_service.host`: everything the service does, without pywin32
  (tested on Linux);
- :mod:`windows_service.service`: the pywin32 ``ServiceFramework`` class
  (imports pywin32; Windows only);
- :mod:`windows_service.manage`: ``imageqc service install|remove|start|stop``.

See ``windows_service/README.md``.
"""

__all__: list[str] = []
