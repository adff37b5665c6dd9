# ruff: noqa: F821 - dbus-fast reads D-Bus type signatures from the annotations
"""A freedesktop notification server for the tests: ``python tests/notification_server.py OUT.jsonl``.

Owns ``org.freedesktop.Notifications`` on the session bus named by
``DBUS_SESSION_BUS_ADDRESS`` (a real dbus-daemon the test starts), answers the
calls a desktop's notification daemon answers, and appends every notification
it receives to OUT as a JSON line (app, summary, body, urgency). Prints
``ready`` once it owns the name.
"""

import asyncio
import json
import sys

from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method, signal


class Notifications(ServiceInterface):
    def __init__(self, out: str) -> None:
        super().__init__("org.freedesktop.Notifications")
        self.out = out
        self.count = 0

    @method()
    def GetCapabilities(self) -> "as":
        return ["body", "actions"]

    @method()
    def GetServerInformation(self) -> "ssss":
        return ["imageqc-test-notifyd", "imageqc tests", "1.0", "1.2"]

    @method()
    def Notify(
        self,
        app_name: "s",
        replaces_id: "u",
        app_icon: "s",
        summary: "s",
        body: "s",
        actions: "as",
        hints: "a{sv}",
        expire_timeout: "i",
    ) -> "u":
        self.count += 1
        urgency = hints.get("urgency")
        record = {
            "app": app_name,
            "summary": summary,
            "body": body,
            "urgency": urgency.value if isinstance(urgency, Variant) else None,
        }
        with open(self.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        return self.count

    @method()
    def CloseNotification(self, notification_id: "u") -> None:
        self.NotificationClosed(notification_id, 3)

    @signal()
    def NotificationClosed(self, notification_id: "u", reason: "u") -> "uu":
        return [notification_id, reason]

    @signal()
    def ActionInvoked(self, notification_id: "u", action_key: "s") -> "us":
        return [notification_id, action_key]


async def main(out: str) -> None:
    bus = await MessageBus().connect()
    bus.export("/org/freedesktop/Notifications", Notifications(out))
    await bus.request_name("org.freedesktop.Notifications")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
