//! The error a settings type's `validate()` returns when one of its fields
//! cannot work. It lives apart from `crate::config` so that library types
//! (plugins, logging) can validate themselves without depending on the
//! config loader, which depends on them.

/// A field that cannot work, named within its section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidSetting {
    /// The field at fault, within its section.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

pub(crate) fn invalid(
    field: &'static str,
    reason: impl Into<String>,
) -> Result<(), InvalidSetting> {
    Err(InvalidSetting {
        field,
        reason: reason.into(),
    })
}
