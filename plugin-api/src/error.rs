/// An error from the host or a plugin, as text: it crosses the ABI as a string anyway.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error(m.into())
    }

    /// Whether a host refused an op it does not know (one older than this plugin-api), as
    /// every host since 1.0 words it (`op::Op::decode`).
    pub fn is_unknown_op(&self) -> bool {
        self.0.contains("is not known to this host")
    }
}

impl From<abi_stable::std_types::RString> for Error {
    fn from(s: abi_stable::std_types::RString) -> Self {
        Error(s.into_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns early with an [`Error`] built from a format string.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::Error(format!($($t)*))) };
}
