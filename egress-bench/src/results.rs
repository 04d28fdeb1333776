//! What one benchmark run produced, as stored in `results.json`: written by
//! the orchestrator (`run`) as cells finish, read by `report`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One measured cell, as stored in results.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub workload: String,
    pub variant: String,
    pub path: String,
    pub system: String,
    pub n: u32,
    pub rep: u32,
    pub ok: bool,
    pub error: Option<String>,
    pub metrics: BTreeMap<String, f64>,
}

impl Record {
    /// A cell that has not failed yet and has no metric yet.
    pub fn new(workload: &str, variant: &str, path: &str, system: &str, n: u32, rep: u32) -> Self {
        Self {
            workload: workload.into(),
            variant: variant.into(),
            path: path.into(),
            system: system.into(),
            n,
            rep,
            ok: true,
            error: None,
            metrics: BTreeMap::new(),
        }
    }

    /// The set-up (and verification) of `system` for N = `n`: one record
    /// per system, N and repetition, failed when `outcome` is an error.
    pub fn setup(
        system: &str,
        n: u32,
        rep: u32,
        outcome: Result<()>,
        metrics: BTreeMap<String, f64>,
    ) -> Self {
        let mut r = Self::new("setup", "", "", system, n, rep);
        r.metrics = metrics;
        if let Err(e) = outcome {
            r.fail(&e);
        }
        r
    }

    pub fn fail(&mut self, e: &anyhow::Error) {
        self.ok = false;
        self.error = Some(format!("{e:#}"));
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub rustc_profile: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub started: String,
    pub command: String,
    pub quick: bool,
    pub systems: Vec<String>,
    pub ns: Vec<u32>,
    pub reps: u32,
    pub secs: f64,
    pub warmup_secs: f64,
    pub concurrency: u32,
    pub iptables: String,
    pub settings: BTreeMap<String, String>,
    pub machine: Machine,
    pub records: Vec<Record>,
}

impl Results {
    /// Rewrites `dir/results.json`; called after every cell, so that an
    /// interrupted run keeps what it measured.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        Ok(())
    }
}
