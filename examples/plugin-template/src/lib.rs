//! A minimal retryq transport plugin: writes each report to a folder and
//! calls it delivered. Replace `push` with your upstream call.
//!
//! Settings (`[pusher.settings]` in retryq's config):
//! - `out_dir` (required): where reports are written.

use std::path::PathBuf;

use retryq_plugin::{CallContext, ItemMeta, PushOutcome, Pusher};
use serde::Deserialize;

/// The plugin's settings; unknown keys are refused so typos surface.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where reports are written.
    pub out_dir: PathBuf,
}

/// The transport.
#[derive(Debug)]
pub struct FolderPusher {
    settings: Settings,
}

impl FolderPusher {
    /// Builds the transport from its settings; an `Err` is shown to the
    /// operator as the reason the settings were refused.
    pub fn from_settings(value: &serde_json::Value) -> Result<Self, String> {
        let settings: Settings =
            serde_json::from_value(value.clone()).map_err(|e| format!("settings: {e}"))?;
        std::fs::create_dir_all(&settings.out_dir)
            .map_err(|e| format!("out_dir {}: {e}", settings.out_dir.display()))?;
        retryq_plugin::host_log(retryq_plugin::abi::RQ_LOG_INFO, "folder pusher ready");
        Ok(FolderPusher { settings })
    }
}

impl Pusher for FolderPusher {
    fn push(&self, item: &ItemMeta, payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        // The item ID is stable across retries: use it as an idempotency key.
        let path = self.settings.out_dir.join(format!("{}.json", item.id));
        match std::fs::write(&path, payload) {
            Ok(()) => PushOutcome::Delivered,
            // A full disk upstream is transient: retry with backoff.
            Err(e) => PushOutcome::retryable(format!("writing {}: {e}", path.display())),
        }
    }
}

retryq_plugin::export_plugin! {
    name: "plugin-template",
    pusher: FolderPusher::from_settings,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn writes_the_report_and_refuses_unknown_settings() {
        let dir = std::env::temp_dir().join(format!("retryq-template-{}", std::process::id()));
        let p = FolderPusher::from_settings(&serde_json::json!({"out_dir": dir})).unwrap();
        let item = ItemMeta {
            id: "item-1".into(),
            ..ItemMeta::default()
        };
        let ctx = CallContext::with_timeout(Duration::from_secs(1));
        assert_eq!(p.push(&item, b"{}", &ctx), PushOutcome::Delivered);
        assert_eq!(std::fs::read(dir.join("item-1.json")).unwrap(), b"{}");
        assert!(FolderPusher::from_settings(&serde_json::json!({"out_dri": "x"})).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
