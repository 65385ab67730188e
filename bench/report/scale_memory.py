"""Section 7's memory part: the USS of each server's process tree against the goal, the
largest processes, and one sentence on what jlserve's extra memory is."""

from __future__ import annotations

from typing import Any

from bench.common import median


def uss_by_role(runs: list[dict[str, Any]]) -> dict[str, float]:
    """USS MiB per process role (summed over same-role processes), median over rounds."""
    per_round = []
    for run in runs:
        roles: dict[str, float] = {}
        for proc in run["memory"].get("processes", []):
            role = _process_role(proc)
            roles[role] = roles.get(role, 0.0) + proc["uss"] / 2**20
        per_round.append(roles)
    names = {role for roles in per_round for role in roles}
    return {role: median([r.get(role, 0.0) for r in per_round]) for role in names}


def _process_role(proc: dict[str, Any]) -> str:
    """What one process of a server's tree is, from its name and command line."""
    if proc["name"].startswith("VLLM::"):
        return proc["name"].removeprefix("VLLM::")
    if "resource_tracker" in proc["cmdline"]:
        return "resource tracker"
    if "api_server" in proc["cmdline"] or "jlserve" in proc["cmdline"]:
        return "API server"
    return proc["name"]


def memory_tables(
    doc: dict[str, Any], roles: dict[str, dict[str, float]], labels: dict[str, str]
) -> list[str]:
    """The USS table (fresh start, after the chain) and each server's largest processes;
    roles: `uss_by_role` of each server key, labels: the servers' names by key."""
    chain, mem, mem_chain = doc["chain"], doc["memory"], doc["memory_after_chain"]
    ckpt_mib = doc["checkpoint_bytes"] / 2**20
    allowance = 100 * (mem["goal_max_extra_mib"] - mem["touched_mib"]) / ckpt_mib
    out = [
        "Memory: USS (private bytes) summed over each server's whole process tree (API "
        "server, engine core, workers), right after its first completion; goal: jlserve's "
        f"extra <= the touched tensors + {allowance:.0f} % of the checkpoint.",
        "",
        "| when | jlserve USS MiB | plain vLLM USS MiB | extra MiB | extra / checkpoint | goal MiB (touched + 10 %) | met | jlserve RSS MiB | vLLM RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in (
        ("fresh start (both on the base)", mem),
        (f"after {chain['length']} deltas (vLLM on the merged checkpoint)", mem_chain),
    ):
        out.append(
            f"| {label} | {m['jlserve_uss_mib']:.0f} | {m['vllm_uss_mib']:.0f} | "
            f"**{m['extra_uss_mib']:+.0f}** | {100 * m['extra_over_checkpoint']:+.1f} % | "
            f"<= {m['touched_mib']:.1f} + {m['goal_max_extra_mib'] - m['touched_mib']:.1f} = "
            f"{m['goal_max_extra_mib']:.1f} | {'yes' if m['met'] else '**no**'} | "
            f"{m['jlserve_rss_mib']:.0f} | {m['vllm_rss_mib']:.0f} |"
        )
    if any(roles.values()):
        order = sorted(
            {r for v in roles.values() for r in v},
            key=lambda r: max(v.get(r, 0.0) for v in roles.values()),
            reverse=True,
        )[:5]
        keys = list(roles)
        out += [
            "",
            "Largest processes, USS MiB (same-named processes summed; median over rounds):",
            "",
            "| process | " + " | ".join(labels[k] for k in keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for role in order:
            out.append(
                f"| {role} | " + " | ".join(f"{roles[k].get(role, 0.0):.0f}" for k in keys) + " |"
            )
    return out


def memory_sentence(doc: dict[str, Any], roles: dict[str, dict[str, float]]) -> str:
    """jlserve's extra private memory against the goal, and the process that differs most
    from plain vLLM's at start."""
    chain, mem, mem_chain = doc["chain"], doc["memory"], doc["memory_after_chain"]
    verdict = "met" if mem["met"] and mem_chain["met"] else "**missed**"
    sentence = (
        f"jlserve's process tree holds {mem['extra_uss_mib']:+.0f} MiB of private memory more "
        f"than plain vLLM's at start ({100 * mem['extra_over_checkpoint']:+.0f} % of the "
        f"checkpoint) and {mem_chain['extra_uss_mib']:+.0f} MiB after {chain['length']} deltas "
        f"(goal <= {mem['goal_max_extra_mib']:.0f} and {mem_chain['goal_max_extra_mib']:.0f} "
        f"MiB: {verdict})"
    )
    if "jlserve" in roles and "vllm" in roles:
        role_diff = {
            r: roles["jlserve"].get(r, 0.0) - roles["vllm"].get(r, 0.0)
            for r in roles["jlserve"].keys() | roles["vllm"].keys()
        }
        if role_diff:
            top = max(role_diff, key=lambda r: abs(role_diff[r]))
            sentence += (
                f"; by process the largest difference at start is the {top} "
                f"({role_diff[top]:+.0f} MiB)"
                + (", the process jlserve's plugin runs in" if top == "API server" else "")
            )
    return sentence + "."
