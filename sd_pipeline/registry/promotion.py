"""Champion and challenger: which version serves, whether a challenger replaces it, rollback.

The champion is the version the ``registry.champion_alias`` alias points at. A challenger
replaces it when its evaluation beats the champion's (evaluated with the same prompts,
seeds and holdout set) on every ``registry.promote_when`` rule; the first version becomes
champion. Every decision is written on the model versions as tags (who, when, why), so
the registry itself explains each move of the alias, and rollback follows those tags.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sd_pipeline.config import PromotionRule, RegistryConfig
from sd_pipeline.registry.tracking import RUN_TAG, open_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("sd_pipeline.registry")

DECISION_TAG = "sd_pipeline.promotion.decision"  # promoted | kept_challenger | rejected_by_reviewer
DECIDED_BY_TAG = "sd_pipeline.promotion.by"
DECIDED_AT_TAG = "sd_pipeline.promotion.at"
REASON_TAG = "sd_pipeline.promotion.reason"
COMPARED_WITH_TAG = "sd_pipeline.promotion.compared_with"  # champion version, or "none"
CHECKS_TAG = "sd_pipeline.promotion.checks"  # JSON: each rule with both values
APPROVED_BY_TAG = "sd_pipeline.promotion.approved_by"  # who answered the approval request
APPROVAL_TAG = "sd_pipeline.promotion.approval"  # approved | rejected | timed_out
APPROVAL_AT_TAG = "sd_pipeline.promotion.approval_at"
APPROVAL_COMMENT_TAG = "sd_pipeline.promotion.approval_comment"
REFUSED_PREFIX = "sd_pipeline.approval_refused."  # an answer from someone not in registry.approvers
PREVIOUS_CHAMPION_TAG = "sd_pipeline.previous_champion"  # set when a version becomes champion
ROLLBACK_PREFIX = "sd_pipeline.rollback."  # on the version rolled back from: by, at, reason, to
RESTORED_PREFIX = "sd_pipeline.restored."  # on the version restored: by, at, reason, from


class RegistryRefused(ValueError):
    """A promotion or rollback that cannot be done as asked; the message says what to do."""


class ApprovalRefused(RegistryRefused):
    """An approval from someone who is not in ``registry.approvers``."""


@dataclass(frozen=True)
class ChampionRef:
    """The version serving now, and the pipeline run it came from."""

    model_name: str
    version: str
    run_id: str | None
    mlflow_run_id: str | None


@dataclass
class Verdict:
    """Whether a challenger should become champion, and why, rule by rule."""

    decision: Literal["promote", "keep", "already_champion"]
    reason: str
    champion_version: str | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def promote(self) -> bool:
        return self.decision == "promote"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    rules: list[PromotionRule],
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    champion_version: str | None = None,
) -> Verdict:
    """Apply the promotion rules to two sets of metrics (pure: no registry involved)."""
    if champion is None:
        return Verdict("promote", "there is no champion yet: the first version becomes champion")
    checks = []
    for rule in rules:
        mine, theirs = challenger.get(rule.metric), champion.get(rule.metric)
        check: dict[str, Any] = {"metric": rule.metric, "better": rule.better, "min_delta": rule.min_delta,
                                 "challenger": mine, "champion": theirs}
        if mine is None or theirs is None:
            side = "challenger" if mine is None else "champion"
            check.update(passed=False, note=f"{rule.metric} was not measured for the {side}; "
                         f"measured: {sorted(challenger if mine is None else champion)}")
        else:
            gain = (theirs - mine) if rule.better == "lower" else (mine - theirs)
            passed = gain > 0 and gain >= rule.min_delta
            need = f"needs {rule.better} by > 0" + (f" and >= {rule.min_delta:g}" if rule.min_delta else "")
            check.update(improvement=gain, passed=passed,
                         note=f"{rule.metric} {mine:.6g} vs champion {theirs:.6g}: "
                              f"{'better' if gain > 0 else 'not better'} by {abs(gain):.6g} ({need})")
        checks.append(check)
    failed = [c["note"] for c in checks if not c["passed"]]
    if failed:
        return Verdict("keep", f"does not beat champion version {champion_version}: " + "; ".join(failed),
                       champion_version, checks)
    return Verdict("promote", f"beats champion version {champion_version}: "
                   + "; ".join(c["note"] for c in checks), champion_version, checks)


def current_champion(cfg: RegistryConfig) -> ChampionRef | None:
    """The version ``@champion`` points at, or None (no model, no alias, or no registry yet)."""
    if cfg.tracking_uri.startswith("sqlite:///") and not Path(cfg.tracking_uri.removeprefix("sqlite:///")).exists():
        return None  # nothing was ever registered; do not create a tracking database to find that out
    client = open_client(cfg)
    version = _alias_version(client, cfg.model_name, cfg.champion_alias)
    if version is None:
        return None
    mv = client.get_model_version(cfg.model_name, version)
    return ChampionRef(cfg.model_name, str(mv.version), mv.tags.get(RUN_TAG), mv.run_id)


def check_promotion(cfg: RegistryConfig, version: str, report: Mapping[str, Any], eval_uri: str) -> Verdict:
    """Decide on challenger ``version`` from its evaluation ``report`` and the champion now."""
    champion = current_champion(cfg)
    if champion is not None and champion.version == str(version):
        return Verdict("already_champion", f"version {version} is already @{cfg.champion_alias}",
                       champion.version)
    compared = report.get("champion") or {}
    if champion is None:
        return decide(cfg.promote_when, report["metrics"], None)
    if not compared.get("model_version") and compared.get("skipped"):
        return Verdict("keep", f"the evaluation made no comparison with the champion "
                       f"({compared['skipped']}), so version {champion.version} stays champion",
                       champion.version)
    if str(compared.get("model_version")) != champion.version:
        return Verdict(
            "keep",
            f"the evaluation compared with {_version_label(compared.get('model_version'))} but "
            f"@{cfg.champion_alias} is version {champion.version} now; delete {eval_uri} and evaluate "
            "again to compare with it",
            champion.version,
        )
    if "metrics" not in compared:
        return Verdict("keep", f"champion version {champion.version} could not be evaluated: "
                       f"{compared.get('skipped', 'no metrics recorded')}", champion.version)
    return decide(cfg.promote_when, report["metrics"], compared["metrics"], champion.version)


def apply_promotion(
    cfg: RegistryConfig,
    version: str,
    verdict: Verdict,
    *,
    by: str,
    approval: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Record the decision on ``version`` and, if it wins (and is approved), move the champion alias.

    ``approval`` is a person's answer when one was asked: ``{"approved": bool, "by": str,
    "comment": str}`` (and ``user_id``, ``at`` when known). An approval from someone outside a
    non-empty ``registry.approvers`` is recorded and refused (:class:`ApprovalRefused`): the
    alias does not move. Returns the decision as recorded.
    """
    _check_who(by)
    version = str(version)
    if approval is not None and verdict.promote:
        check_approver(cfg, version, approval)
    record: dict[str, Any] = {"model_name": cfg.model_name, "model_version": version, "by": by,
                              "at": _now(), "champion_before": verdict.champion_version,
                              "checks": verdict.checks}
    if verdict.decision == "already_champion":
        return {**record, "decision": "already_champion", "reason": verdict.reason,
                "champion": version}
    client = open_client(cfg)
    decision = "promoted" if verdict.promote else "kept_challenger"
    reason = verdict.reason
    tags = {DECIDED_BY_TAG: by, DECIDED_AT_TAG: record["at"],
            COMPARED_WITH_TAG: verdict.champion_version or "none",
            CHECKS_TAG: json.dumps(verdict.checks, default=str)}
    if verdict.promote and approval is not None:
        who = str(approval.get("by") or "unknown")
        comment = str(approval.get("comment") or "").strip()
        tags[APPROVED_BY_TAG] = who
        tags[APPROVAL_TAG] = _answer(approval)
        tags[APPROVAL_AT_TAG] = str(approval.get("at") or record["at"])
        tags[APPROVAL_COMMENT_TAG] = comment
        log.info("audit: %s version %s approval request answered %s by %s at %s%s", cfg.model_name,
                 version, tags[APPROVAL_TAG], who, tags[APPROVAL_AT_TAG], f" ({comment})" if comment else "")
        if not approval.get("approved"):
            decision = "rejected_by_reviewer"
            reason = f"rejected by {who}" + (f": {comment}" if comment else "") + f" (rule verdict: {reason})"
        else:
            reason = f"{reason}; approved by {who}" + (f": {comment}" if comment else "")
    if decision == "promoted":
        # The way back is written before the alias moves, so a promotion is always undoable.
        client.set_model_version_tag(cfg.model_name, version, PREVIOUS_CHAMPION_TAG,
                                     verdict.champion_version or "")
        client.set_registered_model_alias(cfg.model_name, cfg.champion_alias, version)
    for key, value in {**tags, DECISION_TAG: decision, REASON_TAG: reason}.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    champion = version if decision == "promoted" else verdict.champion_version
    log.info("audit: %s version %s: %s by %s at %s (%s); @%s is version %s", cfg.model_name, version,
             decision, by, record["at"], reason, cfg.champion_alias, champion)
    return {**record, "decision": decision, "reason": reason, "champion": champion}


def rollback(
    cfg: RegistryConfig, *, by: str, reason: str, to_version: str | None = None
) -> dict[str, Any]:
    """Point the champion alias back at the previous champion (or at ``to_version``).

    The previous champion is the one the current champion replaced (its
    ``sd_pipeline.previous_champion`` tag), so repeated rollbacks walk back through history.
    """
    _check_who(by)
    if len(reason.strip()) < 3:
        raise RegistryRefused(f"reason {reason!r} is too short; say why the champion is rolled back")
    champion = current_champion(cfg)
    if champion is None:
        raise RegistryRefused(
            f"model {cfg.model_name!r} has no @{cfg.champion_alias}; there is nothing to roll back"
        )
    client = open_client(cfg)
    current = client.get_model_version(cfg.model_name, champion.version)
    target = str(to_version) if to_version else current.tags.get(PREVIOUS_CHAMPION_TAG, "")
    if not target:
        raise RegistryRefused(
            f"version {champion.version} of {cfg.model_name} has no previous champion recorded (it was "
            "the first, or was made champion by hand); pass a version to roll back to"
        )
    if target == champion.version:
        raise RegistryRefused(f"version {target} is already @{cfg.champion_alias}")
    _existing_version(client, cfg.model_name, target)
    at = _now()
    client.set_registered_model_alias(cfg.model_name, cfg.champion_alias, target)
    for key, value in {"by": by, "at": at, "reason": reason, "to": target}.items():
        client.set_model_version_tag(cfg.model_name, champion.version, ROLLBACK_PREFIX + key, value)
    for key, value in {"by": by, "at": at, "reason": reason, "from": champion.version}.items():
        client.set_model_version_tag(cfg.model_name, target, RESTORED_PREFIX + key, value)
    log.info("audit: rolled %s @%s back from version %s to %s by %s at %s (%s)", cfg.model_name,
             cfg.champion_alias, champion.version, target, by, at, reason)
    return {"model_name": cfg.model_name, "alias": cfg.champion_alias, "from_version": champion.version,
            "to_version": target, "by": by, "reason": reason, "at": at,
            "model_uri": f"models:/{cfg.model_name}@{cfg.champion_alias}"}


def _answer(approval: Mapping[str, Any]) -> str:
    if approval.get("approved"):
        return "approved"
    return "timed_out" if approval.get("timed_out") else "rejected"


def is_approver(cfg: RegistryConfig, approval: Mapping[str, Any]) -> bool:
    """Whether the person who answered may approve: anyone when ``registry.approvers`` is empty."""
    if not cfg.approvers:
        return True
    who = {str(approval.get(k)) for k in ("by", "user_id") if approval.get(k)}
    return bool(who & set(cfg.approvers))


def check_approver(cfg: RegistryConfig, version: str, approval: Mapping[str, Any]) -> None:
    """Refuse (and record) an approval from outside ``registry.approvers``; rejections and
    timeouts keep the champion as it is, so they stand whoever gave them."""
    if not approval.get("approved") or is_approver(cfg, approval):
        return
    who = str(approval.get("by") or approval.get("user_id") or "unknown")
    at = _now()
    reason = (f"approval by {who!r} refused: only registry.approvers {list(cfg.approvers)} may approve "
              f"promoting {cfg.model_name} version {version}")
    client = open_client(cfg)
    for key, value in {"by": who, "at": at, "reason": reason}.items():
        client.set_model_version_tag(cfg.model_name, version, REFUSED_PREFIX + key, value)
    log.warning("audit: %s at %s", reason, at)
    raise ApprovalRefused(
        f"{reason}. @{cfg.champion_alias} did not move. Ask one of them to answer: trigger sd_train again "
        "(the request is assigned to them), or `sd-pipeline promote` after their review."
    )


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    version = model.aliases.get(alias)
    return str(version) if version is not None else None


def _existing_version(client: MlflowClient, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise RegistryRefused(f"{name} has no version {version!r}; versions: {known}") from None


def _check_who(by: str) -> None:
    if not by or not by.strip():
        raise RegistryRefused("say who decides: an empty 'by' cannot be recorded")


def _version_label(version: Any) -> str:
    return f"version {version}" if version else "no champion"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
