//! `execd-bench`: starts the real agent (release binary) on temporary data
//! dirs, drives it over loopback HTTP from this separate process, measures the
//! six scenarios of BENCHMARKS.md with each baseline measured in the same run,
//! and prints one table.

mod agent;
mod callbacks;
mod jobs;
mod rawhttp;
mod report;
mod scale;
mod submit;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use agent::AgentCmd;
use report::{Outcome, Row};

#[derive(Debug, Parser)]
#[command(
    name = "execd-bench",
    about = "Benchmarks the execd agent against same-run baselines"
)]
struct Args {
    /// The agent binary. Default: target/release/execd of the repository.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The Python interpreter for jobs and baselines; repeat it to run
    /// scenario 3 with each (the others use the first). Default: the real
    /// executable behind `python3` (not a pyenv shim) and, when it is
    /// another one, Debian's `/usr/bin/python3`, the interpreter of the
    /// issue's baseline figures.
    #[arg(long)]
    python: Vec<PathBuf>,
    /// Run only these scenarios, e.g. `--only 1,5`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u32>,
    /// Smaller counts and shorter windows: a smoke run.
    #[arg(long)]
    quick: bool,
}

/// A Python interpreter, and the agent command that runs it for `python` jobs.
pub struct Python {
    pub path: PathBuf,
    /// The agent command, with `python3` on PATH pointing at `path`.
    pub agent: AgentCmd,
}

/// What every scenario needs.
pub struct Ctx {
    pub agent: AgentCmd,
    /// The same agent command, with `python3` on PATH pointing at `python`.
    pub agent_same_python: AgentCmd,
    pub python: PathBuf,
    /// Every interpreter scenario 3 runs with, `python` first.
    pub pythons: Vec<Python>,
    pub quick: bool,
    /// The repository root (for the migrations of the raw-SQLite baseline).
    pub repo: PathBuf,
    /// Parent of every temp dir of this run (on the system temp disk).
    pub scratch: PathBuf,
}

impl Ctx {
    /// A fresh directory for one agent's data (the agent creates it).
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }

    /// `full` normally, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the bench package lives inside the repository")?
        .to_path_buf();
    let bin = args
        .agent_bin
        .clone()
        .unwrap_or_else(|| repo.join("target/release/execd"));
    if !bin.is_file() {
        bail!(
            "no agent binary at {} (run `cargo build --release` in the repository, or pass --agent-bin)",
            bin.display()
        );
    }
    let interpreters = match args.python.is_empty() {
        false => args.python.clone(),
        true => default_pythons()?,
    };
    let scratch_dir = tempfile::Builder::new().prefix("execd-bench-").tempdir()?;
    let scratch = scratch_dir.path().to_path_buf();
    let agent = AgentCmd {
        bin: bin.clone(),
        path_prefix: None,
    };
    // For each, a directory whose `python3` is that interpreter, put first on
    // the agent's PATH where a scenario compares with spawning it directly.
    let mut pythons = Vec::new();
    for (i, path) in interpreters.into_iter().enumerate() {
        let pybin = scratch.join(format!("pybin{i}"));
        std::fs::create_dir_all(&pybin)?;
        std::os::unix::fs::symlink(&path, pybin.join("python3"))?;
        let agent = AgentCmd {
            path_prefix: Some(pybin),
            ..agent.clone()
        };
        pythons.push(Python { path, agent });
    }
    let python = pythons[0].path.clone();
    let ctx = Ctx {
        agent_same_python: pythons[0].agent.clone(),
        agent,
        python: python.clone(),
        pythons,
        quick: args.quick,
        repo,
        scratch,
    };

    let machine = machine(&ctx.scratch);
    println!("execd-bench{}", if args.quick { " (quick)" } else { "" });
    for line in &machine {
        println!("  {line}");
    }
    println!("  agent: {}", bin.display());
    for python in &ctx.pythons {
        println!("  python: {}", python.path.display());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<(u32, String)> = Vec::new();
    type Scenario =
        fn(&Ctx) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Outcome>> + '_>>;
    let scenarios: [(u32, &str, Scenario); 6] = [
        (1, "durable submissions", |c| {
            Box::pin(submit::submissions(c))
        }),
        (2, "pickup", |c| Box::pin(submit::pickup(c))),
        (3, "trivial jobs end to end", |c| Box::pin(jobs::trivial(c))),
        (4, "output 200 MB", |c| Box::pin(jobs::output(c))),
        (5, "callbacks", |c| Box::pin(callbacks::callbacks(c))),
        (6, "scale: 100k executions", |c| Box::pin(scale::scale(c))),
    ];
    for (n, name, run) in scenarios {
        if !args.only.is_empty() && !args.only.contains(&n) {
            continue;
        }
        println!("\n== {n}. {name}");
        let t = Instant::now();
        match runtime.block_on(run(&ctx)) {
            Ok(outcome) => {
                rows.extend(outcome.rows);
                notes.extend(outcome.notes.into_iter().map(|s| (n, s)));
            }
            Err(e) => {
                println!("    ERROR: {e:#}");
                rows.push(Row::new(
                    &n.to_string(),
                    name,
                    format!("ERROR: {e:#}"),
                    "",
                    String::new(),
                    Some(false),
                ));
            }
        }
        println!("    ({:.1} s)", t.elapsed().as_secs_f64());
    }
    drop(runtime);

    println!(
        "\n## Results ({:.0} s in all)\n",
        started.elapsed().as_secs_f64()
    );
    for line in &machine {
        println!("- {line}");
    }
    println!();
    report::print_table(&rows);
    if !notes.is_empty() {
        println!("\nNotes:");
        for (n, note) in notes {
            println!("- [{n}] {note}");
        }
    }
    drop(scratch_dir);
    Ok(())
}

/// The real interpreter behind `python3`, and Debian's when that is another
/// one: the figures for direct spawning are of Debian's `python3`.
fn default_pythons() -> Result<Vec<PathBuf>> {
    let mut pythons = vec![real_python()?];
    let debian = Path::new("/usr/bin/python3");
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    };
    if debian.is_file() && !same(debian, &pythons[0]) {
        pythons.push(debian.to_path_buf());
    }
    Ok(pythons)
}

/// The real interpreter behind `python3`: a pyenv shim costs a bash script
/// and a second exec on every spawn, which is not what is being measured.
fn real_python() -> Result<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("python3 is not on PATH (pass --python)")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || path.is_empty() {
        bail!("python3 could not tell its executable (pass --python)");
    }
    Ok(PathBuf::from(path))
}

/// The machine, as the table's reader needs it: cores, CPU, kernel, memory,
/// and the disk under the temp dirs (fsync cost drives scenario 1).
fn machine(scratch: &Path) -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    // Another build or test run on the same 2 cores skews every figure.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    vec![
        format!("cpu: {cores} cores, {model}"),
        format!("memory: {:.1} GiB", mem_kib as f64 / 1048576.0),
        format!("kernel: Linux {}", kernel.trim()),
        format!("temp dir: {}", disk(scratch)),
        format!("load average at start: {}", load.join(" ")),
    ]
}

/// Mount, file system and device of `path`, and whether the device rotates.
fn disk(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(&str, &str, &str)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || !path.starts_with(f[1]) {
            continue;
        }
        if best.is_none_or(|(_, m, _)| f[1].len() >= m.len()) {
            best = Some((f[0], f[1], f[2]));
        }
    }
    let Some((dev, mount, fs)) = best else {
        return format!("{} (mount unknown)", path.display());
    };
    let name = dev.rsplit('/').next().unwrap_or(dev);
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let rotational = std::fs::read_to_string(format!("/sys/block/{base}/queue/rotational"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/block/{name}/queue/rotational")))
        .map(|s| {
            if s.trim() == "1" {
                "rotational"
            } else {
                "non-rotational"
            }
        })
        .unwrap_or("rotation unknown");
    format!(
        "{} on {dev} ({fs}, mounted at {mount}, {rotational})",
        path.display()
    )
}
