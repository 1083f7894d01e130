//! The static kernel report (`prefix_tune::kernel_report`) over the kernels embedded in this
//! build, with its targets asserted: CI runs it through `cargo test`.
//!
//! It disassembles the embedded sm_90 cubin and an sm_80 compile of the embedded PTX (ptxas),
//! prints the report (also written to `target/kernel-report.md`) and checks, for every
//! attention kernel with a tensor-core main loop, the per-HMMA figures and the occupancy
//! against the bounds below (FlashAttention-2's figures where parity is the target; see
//! BENCHMARKS.md for the measurement of FA2's own kernels through the same report).
//!
//! cuobjdump and nvdisasm come from `$PREFIX_TUNE_CUDA_TOOLS`, the cache, or are installed into
//! the cache from NVIDIA's pip wheels. Without the kernels or the tools the test skips visibly,
//! and fails instead under `PREFIX_TUNE_REQUIRE_KERNELS=1`.

mod common;

use prefix_tune::cuda::attention::backward_launches;
use prefix_tune::kernel_report::{self, Arch, KernelRow, Tools};
use prefix_tune::reference::attention::AttnShape;

/// SMs of an H100 SXM (and an H200).
const H100_SMS: u32 = 132;

/// Upper bounds on a main loop's figures, and the least CTAs per SM, per kernel and arch.
struct Bound {
    kernel: &'static str,
    /// Issue slots per HMMA.
    slots: f64,
    /// Shared-memory bytes read per HMMA.
    smem_read: f64,
    /// Barriers per tile.
    barriers: f64,
    /// Least CTAs per SM on sm_90.
    ctas_sm90: u32,
}

/// The bounds (sm_80 and sm_90 alike): regression guards at the figures reached so far
/// (BENCHMARKS.md: before, after, and FA2's own kernels through the same report). Where FA2 is
/// better the FA2 figure is in the comment: that target is not met yet.
const BOUNDS: &[Bound] = &[
    // FA2 fwd d64 (128x128): 4.45 slots, 144 B; ours 128x64 with Q in registers.
    Bound {
        kernel: "prefix_attn_fwd_d64",
        slots: 4.6,
        smem_read: 144.0,
        barriers: 2.0,
        ctas_sm90: 2,
    },
    // FA2 fwd d128 (128x64, spills with nvcc 13.0): 3.52 slots, 160 B; ours 128x32, no spill.
    Bound {
        kernel: "prefix_attn_fwd_d128",
        slots: 4.1,
        smem_read: 195.0,
        barriers: 2.0,
        ctas_sm90: 2,
    },
    // FA2 bwd d64 (128x128, 8 warps): 3.88 slots, 230 B, 3 barriers, 1 CTA/SM; ours the same
    // shape and warp layouts: 3.35 slots, 234 B (the extra 4 B: lse2/delta, which FA2 reads from
    // global memory, come from shared memory after their cp.async).
    Bound {
        kernel: "prefix_attn_bwd_dkdv_d64",
        slots: 3.88,
        smem_read: 235.0,
        barriers: 3.0,
        ctas_sm90: 1,
    },
    // FA2 bwd d128 (64x128, 8 warps): 2.97 slots, 230 B; ours 2.74, 234 B.
    Bound {
        kernel: "prefix_attn_bwd_dkdv_d128",
        slots: 2.97,
        smem_read: 235.0,
        barriers: 3.0,
        ctas_sm90: 1,
    },
    Bound {
        kernel: "prefix_attn_bwd_dq_d64",
        slots: 9.5,
        smem_read: 300.0,
        barriers: 2.0,
        ctas_sm90: 3,
    },
    Bound {
        kernel: "prefix_attn_bwd_dq_d128",
        slots: 5.6,
        smem_read: 300.0,
        barriers: 2.0,
        ctas_sm90: 2,
    },
];

fn tools_or_skip(test: &str) -> Option<Tools> {
    if !prefix_tune::cuda::modules::KERNELS_BUILT {
        common::skip(
            "PREFIX_TUNE_REQUIRE_KERNELS",
            test,
            "built without nvcc: no kernels embedded",
        );
        return None;
    }
    match Tools::find_or_install(true) {
        Ok(t) if t.ptxas.is_some() => Some(t),
        Ok(_) => {
            common::skip("PREFIX_TUNE_REQUIRE_KERNELS", test, "ptxas not found");
            None
        }
        Err(e) => {
            common::skip(
                "PREFIX_TUNE_REQUIRE_KERNELS",
                test,
                &format!("no cuobjdump/nvdisasm: {e:#}"),
            );
            None
        }
    }
}

fn check(row: &KernelRow, b: &Bound) -> Vec<String> {
    let mut bad = Vec::new();
    let what = format!("{} {}", row.label, row.arch.name());
    let Some(m) = row.main_loop else {
        return vec![format!("{what}: no HMMA main loop found")];
    };
    let slots = m.slots_per_hmma().unwrap();
    let rd = m.smem_read_per_hmma().unwrap();
    let bar = row.barriers_per_tile().unwrap_or(f64::INFINITY);
    if slots > b.slots {
        bad.push(format!(
            "{what}: {slots:.2} issue slots per HMMA > {}",
            b.slots
        ));
    }
    if rd > b.smem_read {
        bad.push(format!(
            "{what}: {rd:.0} smem bytes read per HMMA > {}",
            b.smem_read
        ));
    }
    if bar > b.barriers + 1e-9 {
        bad.push(format!(
            "{what}: {bar:.2} barriers per tile > {}",
            b.barriers
        ));
    }
    if row.arch == Arch::Sm90 && row.occupancy.ctas_per_sm < b.ctas_sm90 {
        bad.push(format!(
            "{what}: {} CTAs per SM < {} ({})",
            row.occupancy.ctas_per_sm, b.ctas_sm90, row.occupancy.limiter
        ));
    }
    if row.resources.stack != 0 || row.resources.local != 0 {
        bad.push(format!("{what}: uses local memory"));
    }
    bad
}

#[test]
fn kernel_report_meets_its_targets() {
    let test = "kernel_report_meets_its_targets";
    let Some(tools) = tools_or_skip(test) else {
        return;
    };
    let rows = kernel_report::embedded_report(&tools).expect("kernel report");
    let md = kernel_report::markdown(&rows);
    println!("{md}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kernel-report.md");
    let _ = std::fs::write(&out, &md);

    // Every configuration of the launch wrappers is in the report, on both architectures.
    let configs: Vec<String> = kernel_report::embedded_configs()
        .into_iter()
        .flat_map(|(_, c)| c.into_iter().map(|c| c.label))
        .collect();
    for c in &configs {
        for arch in [Arch::Sm80, Arch::Sm90] {
            assert!(
                rows.iter().any(|r| &r.label == c && r.arch == arch),
                "{c} {} missing from the report",
                arch.name()
            );
        }
    }
    let mut bad = Vec::new();
    for b in BOUNDS {
        assert!(
            configs.iter().any(|c| c == b.kernel),
            "no kernel {}",
            b.kernel
        );
        for r in rows.iter().filter(|r| r.label == b.kernel) {
            bad.extend(check(r, b));
        }
    }
    // Every kernel fits its launch on both architectures, without local memory (the build
    // checks the sm_90 cubin; this also covers the sm_80 compile of the PTX).
    for r in &rows {
        if r.resources.stack != 0 || r.resources.local != 0 {
            bad.push(format!(
                "{} {}: {} B stack, {} B local memory",
                r.label,
                r.arch.name(),
                r.resources.stack,
                r.resources.local
            ));
        }
        if r.occupancy.ctas_per_sm == 0 {
            bad.push(format!(
                "{} {}: does not fit ({} B smem)",
                r.label,
                r.arch.name(),
                r.occupancy.smem_per_cta
            ));
        }
    }
    // The backward fills an H100 (132 SMs) on SmolLM2's attention shape: at least one CTA per
    // resident slot (SMs x CTAs per SM) for the dK/dV kernel.
    let smollm2 = AttnShape {
        batch: 8,
        q_heads: 9,
        kv_heads: 3,
        seq: 512,
        prefix: 10,
        head_dim: 64,
        n_prefixes: 2,
    };
    let dkdv = backward_launches(&smollm2, false).dkdv;
    let ctas = dkdv.grid.0 * dkdv.grid.1;
    let row = rows
        .iter()
        .find(|r| r.label == dkdv.kernel && r.arch == Arch::Sm90)
        .expect("dK/dV row");
    let slots = H100_SMS * row.occupancy.ctas_per_sm;
    println!(
        "SmolLM2 (B=8, T=512, 9/3 heads, D=64, P=10) backward: {} dK/dV CTAs of {} threads, {} per \
         SM on sm_90: {:.2} waves over {H100_SMS} SMs",
        ctas,
        dkdv.threads,
        row.occupancy.ctas_per_sm,
        ctas as f64 / slots as f64
    );
    if ctas < slots {
        bad.push(format!(
            "{}: {ctas} CTAs for SmolLM2's shape leave SMs idle ({slots} resident slots)",
            dkdv.kernel
        ));
    }
    assert!(
        bad.is_empty(),
        "kernel report targets missed:\n{}",
        bad.join("\n")
    );
    println!(
        "RESULT kernel_report: {} rows, every target met",
        rows.len()
    );
}
