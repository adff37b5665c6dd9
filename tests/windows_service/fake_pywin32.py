"""Stand-ins for pywin32 and the Windows service manager, for tests on any OS.

They follow pywin32's documented behaviour, as read in its sources
(win32/Lib/win32serviceutil.py, win32/src/PythonService.cpp):

- ``ServiceFramework.__init__`` registers the control handler;
  ``ReportServiceStatus`` builds a SERVICE_STATUS (controls accepted only
  outside START_PENDING; checkpoint 0 for RUNNING and STOPPED, counting up
  otherwise); ``SvcRun`` reports RUNNING, calls ``SvcDoRun``, then reports
  STOP_PENDING.
- pythonservice.exe reports START_PENDING, builds the class named by the
  registered class string, calls ``SvcRun``, and finally reports STOPPED:
  with ERROR_SERVICE_SPECIFIC_ERROR (1066) if ``SvcRun`` raised, after
  writing the traceback to the event log.
- The service manager sends STOP only to a service that accepts it.

Only what imageqc uses is here. Real constant values are used.
"""

from __future__ import annotations

import importlib
import threading
import time
import traceback
import types
from dataclasses import dataclass, field
from typing import Any

# win32service / winerror constants (real values)
SERVICE_STOPPED, SERVICE_START_PENDING, SERVICE_STOP_PENDING, SERVICE_RUNNING = 1, 2, 3, 4
SERVICE_ACCEPT_STOP, SERVICE_ACCEPT_PAUSE_CONTINUE, SERVICE_ACCEPT_SHUTDOWN = 1, 2, 4
SERVICE_CONTROL_STOP, SERVICE_CONTROL_INTERROGATE, SERVICE_CONTROL_SHUTDOWN = 1, 4, 5
SERVICE_WIN32_OWN_PROCESS = 0x10
SERVICE_AUTO_START, SERVICE_DEMAND_START = 2, 3
SC_MANAGER_ALL_ACCESS, SERVICE_ALL_ACCESS = 0xF003F, 0xF01FF
SC_ACTION_NONE, SC_ACTION_RESTART = 0, 1
SERVICE_CONFIG_DESCRIPTION, SERVICE_CONFIG_FAILURE_ACTIONS = 1, 2
SERVICE_CONFIG_DELAYED_AUTO_START_INFO, SERVICE_CONFIG_FAILURE_ACTIONS_FLAG = 3, 4
ERROR_ACCESS_DENIED = 5
ERROR_SERVICE_REQUEST_TIMEOUT = 1053
ERROR_SERVICE_ALREADY_RUNNING = 1056
ERROR_SERVICE_DOES_NOT_EXIST = 1060
ERROR_SERVICE_NOT_ACTIVE = 1062
ERROR_SERVICE_SPECIFIC_ERROR = 1066
ERROR_SERVICE_EXISTS = 1073

STATE_NAMES = {1: "STOPPED", 2: "START_PENDING", 3: "STOP_PENDING", 4: "RUNNING"}


class error(Exception):
    """pywintypes.error: ``(winerror, funcname, strerror)``."""

    def __init__(self, winerror: int, funcname: str, strerror: str) -> None:
        super().__init__(winerror, funcname, strerror)
        self.winerror, self.funcname, self.strerror = winerror, funcname, strerror


@dataclass
class ServiceRecord:
    """One installed service, as the service manager and the registry hold it."""

    name: str
    class_string: str
    display_name: str
    start_type: int
    deps: Any
    user: str | None
    password: str | None
    description: str | None
    delayed: bool | None
    params: dict[str, Any] = field(default_factory=dict)
    failure_actions: dict[str, Any] | None = None
    failure_actions_on_error: bool = False
    status: tuple[int, ...] = (SERVICE_WIN32_OWN_PROCESS, SERVICE_STOPPED, 0, 0, 0, 0, 0)
    history: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    instance: Any = None
    thread: threading.Thread | None = None

    @property
    def state(self) -> int:
        return self.status[1]

    def states(self) -> list[str]:
        return [STATE_NAMES[s[1]] for _t, s in self.history]


class FakeServiceManager:
    """The service manager, the registry and pythonservice.exe, in one object."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceRecord] = {}
        self.events: list[tuple[str, str]] = []  # the Application event log: (level, message)
        self.deny_access = False
        self.handles_open = 0
        self._lock = threading.Lock()
        self._handlers: dict[str, Any] = {}

    # -- service manager side ----------------------------------------------

    def get(self, name: str, func: str) -> ServiceRecord:
        if self.deny_access:
            raise error(ERROR_ACCESS_DENIED, func, "Access is denied.")
        try:
            return self.services[name]
        except KeyError:
            raise error(
                ERROR_SERVICE_DOES_NOT_EXIST, func, "The specified service does not exist as an installed service."
            ) from None

    def set_status(self, name: str, status: tuple[int, ...]) -> None:
        with self._lock:
            rec = self.services[name]
            rec.status = tuple(status)
            rec.history.append((time.monotonic(), rec.status))

    def start(self, name: str) -> None:
        """pythonservice.exe: host the registered class in a new 'process' (a thread)."""
        rec = self.get(name, "StartService")
        if rec.state != SERVICE_STOPPED:
            raise error(ERROR_SERVICE_ALREADY_RUNNING, "StartService", "An instance of the service is already running.")
        self.set_status(name, (SERVICE_WIN32_OWN_PROCESS, SERVICE_START_PENDING, 0, 0, 0, 0, 5000))
        rec.thread = threading.Thread(target=self._host, args=(rec,), name=f"fake-pythonservice-{name}", daemon=True)
        rec.thread.start()

    def _host(self, rec: ServiceRecord) -> None:
        module_name, _, cls_name = rec.class_string.rpartition(".")
        failed = False
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            rec.instance = cls([rec.name])
            rec.instance.SvcRun()
        except BaseException:
            failed = True
            self.events.append(("error", "Python service error:\n" + traceback.format_exc()))
        exit_codes = (ERROR_SERVICE_SPECIFIC_ERROR, 0x20000001) if failed else (0, 0)
        self.set_status(rec.name, (SERVICE_WIN32_OWN_PROCESS, SERVICE_STOPPED, 0, *exit_codes, 0, 0))

    def control(self, name: str, code: int) -> None:
        rec = self.get(name, "ControlService")
        if rec.state == SERVICE_STOPPED:
            raise error(ERROR_SERVICE_NOT_ACTIVE, "ControlService", "The service has not been started.")
        accepted = rec.status[2]
        needed = {SERVICE_CONTROL_STOP: SERVICE_ACCEPT_STOP, SERVICE_CONTROL_SHUTDOWN: SERVICE_ACCEPT_SHUTDOWN}.get(
            code, 0
        )
        if needed and not accepted & needed:
            raise error(1052, "ControlService", "The requested control is not valid for this service.")
        self._handlers[name](code, 0, None)

    def wait_for(self, name: str, state: int, timeout: float) -> ServiceRecord:
        rec = self.get(name, "QueryServiceStatus")
        deadline = time.monotonic() + timeout
        while rec.state != state:
            if time.monotonic() > deadline:
                raise error(
                    ERROR_SERVICE_REQUEST_TIMEOUT,
                    "QueryServiceStatus",
                    "The service did not respond in a timely fashion.",
                )
            time.sleep(0.02)
        return rec

    # -- the modules ---------------------------------------------------------

    def modules(self) -> dict[str, types.ModuleType]:
        mgr = self
        pywintypes = types.ModuleType("pywintypes")
        pywintypes.error = error

        sm = types.ModuleType("servicemanager")

        def register(name: str, handler: Any, _ex: bool) -> str:
            mgr._handlers[name] = handler
            return name  # the status handle

        sm.RegisterServiceCtrlHandler = register
        sm.SetEventSourceName = lambda name: None
        sm.LogInfoMsg = lambda msg: mgr.events.append(("info", msg))
        sm.LogWarningMsg = lambda msg: mgr.events.append(("warning", msg))
        sm.LogErrorMsg = lambda msg: mgr.events.append(("error", msg))

        ws = types.ModuleType("win32service")
        for k, v in globals().items():
            if k.isupper() and isinstance(v, int) and not k.startswith("ERROR_"):
                setattr(ws, k, v)
        ws.error = error
        ws.SetServiceStatus = lambda handle, status: mgr.set_status(handle, status)

        def open_scm(machine: Any, database: Any, access: int) -> str:
            if mgr.deny_access:
                raise error(ERROR_ACCESS_DENIED, "OpenSCManager", "Access is denied.")
            mgr.handles_open += 1
            return "scm"

        def open_service(scm: str, name: str, access: int) -> str:
            mgr.get(name, "OpenService")
            mgr.handles_open += 1
            return name

        def change_config2(handle: str, level: int, info: Any) -> None:
            rec = mgr.get(handle, "ChangeServiceConfig2")
            if level == SERVICE_CONFIG_FAILURE_ACTIONS:
                if set(info) != {"ResetPeriod", "RebootMsg", "Command", "Actions"}:  # pywin32 requires exactly these
                    raise TypeError(
                        "SERVICE_FAILURE_ACTIONS must be a dictionary containing ResetPeriod, RebootMsg, Command, Actions"
                    )
                if not all(
                    isinstance(a, tuple) and len(a) == 2 and all(isinstance(x, int) for x in a) for a in info["Actions"]
                ):
                    raise TypeError("SC_ACTIONS must be a sequence of 2-tuples ((int, int),...)")
                rec.failure_actions = dict(info)
            elif level == SERVICE_CONFIG_FAILURE_ACTIONS_FLAG:
                rec.failure_actions_on_error = bool(info)
            else:
                raise ValueError(f"level {level} not faked")

        def close(handle: str) -> None:
            mgr.handles_open -= 1

        ws.OpenSCManager, ws.OpenService, ws.ChangeServiceConfig2, ws.CloseServiceHandle = (
            open_scm,
            open_service,
            change_config2,
            close,
        )

        wsu = types.ModuleType("win32serviceutil")
        wsu.error = RuntimeError

        def install(
            python_class: str,
            name: str,
            display: str,
            startType: Any = None,
            errorControl: Any = None,
            bRunInteractive: int = 0,
            serviceDeps: Any = None,
            userName: Any = None,
            password: Any = None,
            exeName: Any = None,
            perfMonIni: Any = None,
            perfMonDll: Any = None,
            exeArgs: Any = None,
            description: Any = None,
            delayedstart: Any = None,
        ) -> None:
            if mgr.deny_access:
                raise error(ERROR_ACCESS_DENIED, "OpenSCManager", "Access is denied.")
            if name in mgr.services:
                raise error(ERROR_SERVICE_EXISTS, "CreateService", "The specified service already exists.")
            mgr.services[name] = ServiceRecord(
                name=name,
                class_string=python_class,
                display_name=display,
                start_type=SERVICE_DEMAND_START if startType is None else startType,
                deps=serviceDeps,
                user=userName,
                password=password,
                description=description,
                delayed=delayedstart,
            )

        def remove(name: str) -> None:
            mgr.get(name, "OpenService")
            del mgr.services[name]

        def custom_get(service: Any, option: str, default: Any = None) -> Any:
            name = getattr(service, "_svc_name_", service)
            rec = mgr.services.get(name)
            return default if rec is None else rec.params.get(option, default)

        def custom_set(service: Any, option: str, value: Any) -> None:
            mgr.get(getattr(service, "_svc_name_", service), "RegCreateKey").params[option] = value

        def query(name: str, machine: Any = None) -> tuple[int, ...]:
            return mgr.get(name, "QueryServiceStatus").status

        wsu.InstallService, wsu.RemoveService = install, remove
        wsu.GetServiceCustomOption, wsu.SetServiceCustomOption = custom_get, custom_set
        wsu.StartService = lambda name, args=None, machine=None: mgr.start(name)
        wsu.StopService = lambda name, machine=None: mgr.control(name, SERVICE_CONTROL_STOP)
        wsu.QueryServiceStatus = query
        wsu.WaitForServiceStatus = lambda name, status, waitSecs, machine=None: mgr.wait_for(name, status, waitSecs)
        wsu.ServiceFramework = _service_framework(sm, ws)
        return {"pywintypes": pywintypes, "servicemanager": sm, "win32service": ws, "win32serviceutil": wsu}


def _service_framework(sm: types.ModuleType, ws: types.ModuleType) -> type:
    class ServiceFramework:
        _svc_deps_ = None
        _exe_name_ = None
        _exe_args_ = None
        _svc_description_ = None

        def __init__(self, args: list[str]) -> None:
            self.ssh = sm.RegisterServiceCtrlHandler(args[0], self.ServiceCtrlHandlerEx, True)
            sm.SetEventSourceName(self._svc_name_)
            self.checkPoint = 0

        def GetAcceptedControls(self) -> int:
            accepted = 0
            if hasattr(self, "SvcStop"):
                accepted |= SERVICE_ACCEPT_STOP
            if hasattr(self, "SvcShutdown"):
                accepted |= SERVICE_ACCEPT_SHUTDOWN
            return accepted

        def ReportServiceStatus(
            self, serviceStatus: int, waitHint: int = 5000, win32ExitCode: int = 0, svcExitCode: int = 0
        ) -> None:
            accepted = 0 if serviceStatus == SERVICE_START_PENDING else self.GetAcceptedControls()
            if serviceStatus in (SERVICE_RUNNING, SERVICE_STOPPED):
                check = 0
            else:
                self.checkPoint += 1
                check = self.checkPoint
            ws.SetServiceStatus(
                self.ssh,
                (SERVICE_WIN32_OWN_PROCESS, serviceStatus, accepted, win32ExitCode, svcExitCode, check, waitHint),
            )

        def ServiceCtrlHandlerEx(self, control: int, event_type: int, data: Any) -> Any:
            if control == SERVICE_CONTROL_STOP:
                return self.SvcStop()
            if control == SERVICE_CONTROL_SHUTDOWN:
                return self.SvcShutdown()
            if control == SERVICE_CONTROL_INTERROGATE:
                return self.ReportServiceStatus(SERVICE_RUNNING)
            return None

        def SvcRun(self) -> None:
            self.ReportServiceStatus(SERVICE_RUNNING)
            self.SvcDoRun()
            self.ReportServiceStatus(SERVICE_STOP_PENDING)

    return ServiceFramework
