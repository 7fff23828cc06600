"""swim: sans-IO SWIM + Lifeguard membership and dissemination.

Usable on its own; nothing here knows axnet. A driver owns sockets and a
clock and feeds a `Swim` core:

    sw = Swim(name="n1", address=("10.0.0.1", 7946), config=Config.lan(),
              rng=random.Random(), now=clock(), incarnation=int(clock()))
    sw.join(seeds, now)                      # → StreamRequest(purpose=JOIN)
    sw.handle_datagram(src, data, now)       # UDP in
    reply = sw.handle_stream(src, data, now) # TCP in (push-pull, TCP ping)
    sw.handle_stream_reply(peer, data, now)  # reply to a stream we requested
    sw.stream_failed(peer, now)
    sw.tick(now); sw.next_deadline()
    sw.take_datagrams(); sw.take_stream_requests(); sw.take_events()
    sw.broadcast(key, payload); sw.update_meta(meta, now); sw.leave(now)
    sw.deliver([(key, payload)], now)        # → Delivered(token) once acked

`swim.testing.SimNet` runs many cores over a simulated network.
"""

from ._awareness import Awareness as Awareness
from ._broadcast import BroadcastQueue as BroadcastQueue
from ._config import MAX_META_BYTES as MAX_META_BYTES
from ._config import MAX_PACKET_BYTES as MAX_PACKET_BYTES
from ._config import MAX_PUSH_PULL_BYTES as MAX_PUSH_PULL_BYTES
from ._config import Config as Config
from ._core import StateDelegate as StateDelegate
from ._core import Swim as Swim
from ._errors import ProtocolError as ProtocolError
from ._events import Datagram as Datagram
from ._events import Delivered as Delivered
from ._events import Event as Event
from ._events import Member as Member
from ._events import MemberAlive as MemberAlive
from ._events import MemberDead as MemberDead
from ._events import MemberJoined as MemberJoined
from ._events import MemberLeft as MemberLeft
from ._events import MemberReaped as MemberReaped
from ._events import MemberSuspected as MemberSuspected
from ._events import MemberUpdated as MemberUpdated
from ._events import NameConflict as NameConflict
from ._events import StreamPurpose as StreamPurpose
from ._events import StreamRequest as StreamRequest
from ._events import UserMessage as UserMessage
from ._keyring import AuthenticationError as AuthenticationError
from ._keyring import Keyring as Keyring
from ._math import remaining_suspicion_time as remaining_suspicion_time
from ._math import retransmit_limit as retransmit_limit
from ._math import suspicion_timeout as suspicion_timeout
from ._messages import Address as Address
from ._messages import MemberState as MemberState
from ._messages import decode_envelope as decode_envelope
from ._rng import Rng as Rng
from ._stats import Stats as Stats
from ._suspicion import Suspicion as Suspicion
