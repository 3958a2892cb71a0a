//! Compiles `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on; does nothing otherwise.
//!
//! The PTX is embedded in the library (`include_str!` from `OUT_DIR`) and loaded once per device
//! through candle's module cache; the driver compiles it for the GPU it finds. Each PTX file is
//! also assembled for the target architecture with `ptxas`, so a kernel that would fail to
//! compile on the GPU fails the build instead. docs/cuda.md explains the choice.
#![allow(clippy::print_stdout)] // Cargo reads build-script directives from stdout.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernel sources, one PTX module each; the names must match `src/cuda/gpu.rs`.
const KERNELS: [&str; 5] = [
    "rms_norm",
    "rope",
    "kv_cache",
    "paged_attention",
    "sampling",
];

fn main() {
    // Without the feature nothing here runs, so a machine with no CUDA toolkit builds the crate.
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(message) = run() {
        eprintln!("keel-serving build: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_COMPUTE_CAP",
        "DOCS_RS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    // docs.rs has no nvcc: empty modules let the CUDA items compile and render.
    if std::env::var_os("DOCS_RS").is_some() {
        for name in KERNELS {
            write(&out.join(format!("{name}.ptx")), "")?;
        }
        return Ok(());
    }
    let nvcc = tool("nvcc", std::env::var_os("NVCC").map(PathBuf::from));
    let ptxas = tool("ptxas", None);
    // The same variable candle's kernels use, so one setting covers both; 90 is the H200.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_alphanumeric).collect();
    for name in KERNELS {
        let src = Path::new("kernels").join(format!("{name}.cu"));
        let ptx = out.join(format!("{name}.ptx"));
        // No --use_fast_math: the kernels rely on IEEE division, sqrt and expf to match the
        // CPU reference within the bounds docs/cuda.md states.
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--ptx", "-std=c++17", "-O3", "-lineinfo"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src);
        exec(cmd, &format!("nvcc on {}", src.display()))?;
        let mut cmd = Command::new(&ptxas);
        cmd.arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(out.join(format!("{name}.cubin")))
            .arg(&ptx);
        exec(cmd, &format!("ptxas on {name}.ptx for sm_{cap}"))?;
    }
    Ok(())
}

/// `explicit`, else the tool next to `$CUDA_HOME/bin` or `$CUDA_PATH/bin`, else the bare name
/// (found on `PATH`).
fn tool(name: &str, explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin").join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from(name)
}

fn exec(mut cmd: Command, what: &str) -> Result<(), String> {
    let output = cmd.output().map_err(|e| {
        format!(
            "cannot run {what} ({e}); the `cuda` feature needs the CUDA toolkit: run \
             `scripts/cuda-env -- cargo ...` or see docs/cuda.md"
        )
    })?;
    if !output.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
