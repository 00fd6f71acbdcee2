"""De-identification on the way out for a rule with `deidentify = "PROJECT"`: each
instance is read from its record and a de-identified copy, under the project's profile and
key (engine/deidentify/project.py), is what the destination gets; the stored record is
never edited. The copy keeps its record's transfer syntax (RLE Lossless where compressed
pixels were cleaned) and is converted where the destination does not accept that."""
from __future__ import annotations

from stowage.engine.deidentify.project import NotRecorded, Project, Quarantined
from stowage.engine.store.filemeta import file_meta, group_length
from stowage.engine.transfer.results import Instance, Rewrite, RewriteError

NOT_DEIDENTIFIED = "not de-identified"  # starts every reason: deliver.py parks these, never retries them


def rewrite_for(project: Project) -> Rewrite:
    """send.py's rewrite hook: (new SOP Instance UID, transfer syntax, file meta + data set)."""

    def rewrite(inst: Instance, payload: bytes) -> tuple[str, str, bytes]:
        try:
            result = project.deidentify_bytes(payload, inst.transfer_syntax_uid, group_length(payload))
        except Quarantined as e:
            raise RewriteError(f"{NOT_DEIDENTIFIED} under project {project.config.name} (quarantined): {e}") from None
        except NotRecorded as e:  # a full disk passes: the entry stays pending (no NOT_DEIDENTIFIED, not parked)
            raise RewriteError(f"{e}; tried again later") from None
        except Exception as e:  # bytes neither path can read: the record stays, the entry is parked
            raise RewriteError(f"{NOT_DEIDENTIFIED} under project {project.config.name}: "
                               f"{type(e).__name__}: {e}") from None
        uid = result.outcome.sop_instance_uid[1]
        meta = file_meta(result.sop_class_uid or inst.sop_class_uid, uid, result.transfer_syntax)
        return uid, result.transfer_syntax, meta + result.dataset

    return rewrite
