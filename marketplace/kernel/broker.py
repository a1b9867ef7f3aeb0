"""The brokers' transports: kombu's, with two faults mended.

**The embedded default**: kombu's file-system transport, made safe for several processes.

kombu's own writer creates a message file under its final name and fills it afterwards, and its
reader takes a file without the writer's lock: a reader that comes in between reads an empty file
and the worker dies (JSONDecodeError). Its reader also moves the file across file systems (to the
temporary folder), a copy and a delete, so two readers can both take one message. Here a message
is written under a name no reader looks at and renamed into place when complete, and a reader
claims it with a rename inside the broker's own folder: both renames are atomic, so a message is
seen whole or not at all, and claimed by exactly one reader.

Celery uses it when the broker URL is ``filesystem://`` (``CELERY_BROKER_TRANSPORT``).

**Redis**: when Redis goes away, Celery's consumer tears the broken connection down (``collect``)
and then closes it; closing a channel restores its unacknowledged messages, which needs the
connection's address that ``collect`` has just dropped, so the worker dies
(``AttributeError: 'NoneType' object has no attribute 'hostname'``) instead of reconnecting.
``RedisTransport`` skips that restore when the connection is already gone: the messages stay in
Redis's unacknowledged set, from which kombu restores them after the visibility timeout, and
every task that matters has a sweep besides (marketplace/kernel/tasks.py)."""

import logging
import os
import uuid
from queue import Empty
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, redis
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

WRITING = ".writing-"  # the prefix of a message still being written; no queue name matches it


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f"{WRITING}{name}")
        try:
            with open(partial, "wb") as message:
                message.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue):
        wanted = f"{queue}.msg"
        claimed_folder = os.path.join(self.data_folder_in, ".claimed")
        os.makedirs(claimed_folder, exist_ok=True)
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.startswith(".") or name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(claimed_folder, f"{uuid.uuid4()}-{name}")
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except OSError:
                continue  # another reader claimed it first
            try:
                with open(claimed, "rb") as message:
                    payload = message.read()
                os.remove(claimed)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {claimed!r} from queue.") from exc
            return loads(bytes_to_str(payload))
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel


class RedisQoS(redis.QoS):
    def restore_unacked(self, client=None):
        if client is None and self.channel.connection.client is None:
            logger.warning("broker_restore_skipped messages=%d: the connection is gone; Redis keeps them as "
                           "unacknowledged until the visibility timeout", len(self._delivered))  # fmt: skip
            self._delivered.clear()
            return
        return super().restore_unacked(client)


class RedisChannel(redis.Channel):
    QoS = RedisQoS


class RedisTransport(redis.Transport):
    Channel = RedisChannel
