//! The static source: the configuration file. Its desired state is applied
//! whole at start (or the agent does not start), then the file is re-read
//! when its mtime changes (checked once a second); an edit is applied by
//! difference, or rejected as a whole with the running state kept (a bad
//! file, a changed section that needs a restart, a policy that cannot be
//! programmed). Claims are not fenced, and SIGTERM exits at once.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::bail;
use egress_model::{AddressClaim, NodeState};
use egress_netlink::AddressEvent;

use super::{Flow, Source};
use egress_config::AgentConfig;

use crate::agent::Agent;

pub struct FileSource {
    path: PathBuf,
    /// The configuration applied last.
    config: AgentConfig,
    /// The file's mtime when it was read last.
    mtime: Option<SystemTime>,
    reload: tokio::time::Interval,
}

/// The file's modification time, `None` when it cannot be read.
pub fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl FileSource {
    /// Applies `config` (read from `path` when its mtime was `mtime`) whole:
    /// a policy that cannot be programmed stops the agent.
    pub async fn start(
        path: &Path,
        config: AgentConfig,
        mtime: Option<SystemTime>,
        agent: &mut Agent,
    ) -> anyhow::Result<Self> {
        let desired = config.node_state();
        agent
            .apply(&desired, &static_claims(&desired))
            .await?
            .all_applied()?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            mtime,
            reload: tokio::time::interval(Duration::from_secs(1)),
        })
    }

    /// Applies an edited configuration file, or says why it was rejected and
    /// keeps the running state.
    async fn reload_if_changed(&mut self, agent: &mut Agent) {
        let mtime = modified(&self.path);
        if mtime == self.mtime {
            return;
        }
        self.mtime = mtime;
        let new = match AgentConfig::load(&self.path) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "configuration rejected; keeping the running one");
                return;
            }
        };
        if new == self.config {
            return;
        }
        if let Err(e) = self.check_reloadable(&new) {
            tracing::error!(error = %e, "configuration rejected; keeping the running one");
            return;
        }
        let desired = new.node_state();
        let env = agent.env;
        agent.env = env.with_settings(&new.datapath);
        let outcome = agent
            .apply(&desired, &static_claims(&desired))
            .await
            .and_then(|o| Ok(o.all_applied()?));
        match outcome {
            Ok(()) => {
                tracing::info!(policies = new.policies.len(), "configuration reloaded");
                agent
                    .collector
                    .update(new.datapath.timeouts.clone(), new.datapath.gc_interval);
                self.config = new;
            }
            Err(e) => {
                agent.env = env;
                tracing::error!(error = %format!("{e:#}"), "applying the reloaded configuration failed")
            }
        }
    }

    /// Sections fixed at start: changing them needs a restart.
    fn check_reloadable(&self, new: &AgentConfig) -> anyhow::Result<()> {
        if new.instance != self.config.instance {
            bail!("instance: changing it needs a restart");
        }
        if new.node != self.config.node {
            bail!("node: changing this section needs a restart");
        }
        if new.datapath.max_flows != self.config.datapath.max_flows
            || new.datapath.max_policies != self.config.datapath.max_policies
            || new.datapath.max_pods != self.config.datapath.max_pods
        {
            bail!(
                "datapath: map sizes (max_flows, max_policies, max_pods) change only with a restart"
            );
        }
        Ok(())
    }
}

/// The file may have changed: look.
pub struct Recheck;

impl Source for FileSource {
    type Update = Recheck;

    async fn next(&mut self) -> Recheck {
        self.reload.tick().await;
        Recheck
    }

    async fn apply(&mut self, Recheck: Recheck, agent: &mut Agent) -> anyhow::Result<Flow> {
        self.reload_if_changed(agent).await;
        Ok(Flow::Continue)
    }

    /// Applied whole at start, or the agent did not start; a rejected edit
    /// leaves the running state applied.
    fn applied_whole(&self) -> bool {
        true
    }

    async fn on_address_event(&mut self, _: &AddressEvent, _: &Agent) {}

    /// Nothing to wait for: programs, pins and addresses stay for the next
    /// agent.
    fn stop(&mut self) -> bool {
        false
    }

    async fn exit(&mut self, _: &mut Agent) {}
}

/// The addresses a static configuration makes this node hold.
fn static_claims(desired: &NodeState) -> Vec<AddressClaim> {
    desired
        .claims()
        .into_iter()
        .map(|ip| AddressClaim {
            ip,
            interface: None,
        })
        .collect()
}
