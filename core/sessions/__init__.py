"""Sessions (live conversations whose cache stays hot) and snapshots (their state on disk).

Importing this package does not import torch; the classes do when they are used.
"""

from superlinear.sessions.journal import SESSION_STATE_TAG, state_snapshot_id
from superlinear.sessions.manager import SessionManager
from superlinear.sessions.registry import Session, SessionInfos, validate_id
from superlinear.sessions.snapshots import CorruptSnapshot, ModelMismatch, SnapshotStore, check_model

__all__ = ["SESSION_STATE_TAG", "CorruptSnapshot", "ModelMismatch", "Session", "SessionInfos",
           "SessionManager", "SnapshotStore", "check_model", "state_snapshot_id", "validate_id"]
