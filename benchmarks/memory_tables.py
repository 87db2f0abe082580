"""The tables ``benchmarks/memory.py`` prints: memory and training state per configuration, ratios against full
fine-tuning, and the weight footprint of each load; plus the machine facts it prints first."""

from __future__ import annotations

MIB = 1024 * 1024


def version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / MIB:.1f} GiB"
    except OSError:
        pass
    return "n/a"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base else "n/a"


def mib(n_bytes: float) -> float:
    return n_bytes / MIB


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def print_training_table(results: dict[str, dict]) -> None:
    def m(kib: int) -> str:
        return f"{kib / 1024:.0f}"

    print()
    print("memory, MiB (RSS = VmRSS/ru_maxrss, anon = RssAnon, file = RssFile: mapped checkpoint pages)")
    print(
        f"{'config':<12}  {'base RSS':>8}  {'load RSS':>8}  {'load anon':>9}  {'load file':>9}  {'load peak':>9}  "
        f"{'peak RSS':>8}  {'net peak':>8}  {'peak anon':>9}  {'end file':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<12}  {m(r['base_rss_kib']):>8}  {m(r['load_rss_kib']):>8}  {m(r['load_anon_kib']):>9}  "
            f"{m(r['load_file_kib']):>9}  {m(r['load_peak_kib']):>9}  {m(r['peak_kib']):>8}  "
            f"{m(r['peak_kib'] - r['base_rss_kib']):>8}  {m(r['peak_anon_kib']):>9}  {m(r['end_file_kib']):>8}"
        )
    print(
        "  base = before the weights load; load peak = ru_maxrss after the load; peak RSS = ru_maxrss at the end;\n"
        "  net peak = peak RSS - base RSS; peak anon = RssAnon sampled every 20 ms over load and training"
    )
    print()
    print("training state")
    print(
        f"{'config':<12}  {'trainable':>11}  {'train MiB':>9}  {'grad MiB':>8}  {'optim MiB':>9}  {'step s':>6}  "
        f"{'cpu s':>6}  {'1st s':>6}  {'loss':>7}  {'other CPU':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:<12}  {r['trainable_params']:11,}  {mib(r['trainable_bytes']):9.2f}  {mib(r['grad_bytes']):8.2f}  "
            f"{mib(r['optimizer_state_bytes']):9.2f}  {r['step_s']:6.2f}  {r['step_cpu_s']:6.2f}  "
            f"{r['first_step_s']:6.2f}  {r['loss']:7.4f}  {percent(r.get('other_cpu')):>9}"
        )
    print(
        "  trainable = parameters in the optimizer's param groups; step s / cpu s = median wall / process CPU time\n"
        "  of a step without the first (1st s); other CPU = the machine's CPU other processes used meanwhile"
    )
    base = results.get("full")
    if base is None:
        print("  no `full` run: the ratios need it")
        return
    print()
    print("ratios vs full")
    print(
        f"{'config':<12}  {'peak RSS':>8}  {'net peak':>8}  {'peak anon':>9}  {'trainable bytes':>15}  "
        f"{'grads':>7}  {'optim state':>11}  {'step time':>9}"
    )
    base_net = base["peak_kib"] - base["base_rss_kib"]
    for name, r in results.items():
        print(
            f"{name:<12}  {ratio(r['peak_kib'], base['peak_kib']):>8}  "
            f"{ratio(r['peak_kib'] - r['base_rss_kib'], base_net):>8}  "
            f"{ratio(r['peak_anon_kib'], base['peak_anon_kib']):>9}  "
            f"{ratio(r['trainable_bytes'], base['trainable_bytes']):>15}  "
            f"{ratio(r['grad_bytes'], base['grad_bytes']):>7}  "
            f"{ratio(r['optimizer_state_bytes'], base['optimizer_state_bytes']):>11}  "
            f"{ratio(r['step_s'], base['step_s']):>9}"
        )
    print()
    for name, r in results.items():
        print(
            f"  {name}: {r['optimizer']}, {r['param_groups']} param groups, {r['four_bit_tensors']} 4-bit tensors, "
            f"{r['total_params']:,} parameter values in the trained model ({r['requires_grad_params']:,} "
            f"requires_grad at the end), weights loaded in {r['load_s']:.1f} s"
        )


def print_footprint_table(footprint: dict) -> None:
    rows = {row["label"]: row for row in footprint["rows"]}
    bf16 = rows.get("bf16")
    fp32 = rows.get("fp32")
    print()
    print(
        f"{'weights':<16}  {'total bytes':>13}  {'total MiB':>9}  {'blocks MiB':>10}  {'rest MiB':>8}  "
        f"{'qstate MiB':>10}  "
        f"{'footprint()':>11}  {'total/bf16':>10}  {'blocks/bf16':>11}  {'blocks/fp32':>11}"
    )
    for label, row in rows.items():
        print(
            f"{label:<16}  {row['total']:13,}  {mib(row['total']):9.2f}  {mib(row['blocks']):10.2f}  "
            f"{mib(row['total'] - row['blocks']):8.2f}  {mib(row['quant_state']):10.2f}  "
            f"{mib(row['get_memory_footprint']):11.2f}  {ratio(row['total'], bf16['total'] if bf16 else 0):>10}  "
            f"{ratio(row['blocks'], bf16['blocks'] if bf16 else 0):>11}  "
            f"{ratio(row['blocks'], fp32['blocks'] if fp32 else 0):>11}"
        )
    print(
        f"  blocks = tensors under `{footprint['layers']}.`; rest = embeddings (tied head), final norm, "
        "rotary buffers;"
    )
    print(
        "  qstate = 4-bit quantization state (absmax, code tables, nested absmax), counted in total and blocks but "
        "not by get_memory_footprint()"
    )
    quantized = {label: row["four_bit_tensors"] for label, row in rows.items() if row["four_bit_tensors"]}
    print(f"  4-bit tensors per load: {quantized}; kept out of 4-bit: {footprint['skip_modules']}")
    for label, row in rows.items():
        print(f"  {label}: {row['params']:,} parameter values as stored, load {row['load_s']:.1f} s")
