//! `LLMStatusCode` with LLM-DataDist's exact numeric values, and `LLMException`.

use std::fmt;

/// Status codes, numerically identical to `llm_datadist.LLMStatusCode` (GE error layout
/// `0x5010B000 + n`), so logs and callers can compare them with the Python API's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i64)]
pub enum LlmStatusCode {
    /// Success.
    LlmSuccess = 0,
    /// Generic failure; also any code without a mapping.
    LlmFailed = 0xFFFF_FFFF,
    /// Processing timed out (v1 transfer timeout).
    LlmWaitProcessTimeout = 0x5010_B001,
    /// Remote or local cache or key not found (not produced, already pulled, wrong id or index).
    LlmKvCacheNotExist = 0x5010_B002,
    /// Duplicate request.
    LlmRepeatRequest = 0x5010_B003,
    /// Legacy.
    LlmRequestAlreadyCompleted = 0x5010_B004,
    /// Invalid parameter.
    LlmParamInvalid = 0x5010_B005,
    /// Legacy.
    LlmEngineFinalized = 0x5010_B006,
    /// No link to that cluster.
    LlmNotYetLink = 0x5010_B007,
    /// The link already exists.
    LlmAlreadyLink = 0x5010_B008,
    /// Linking failed.
    LlmLinkFailed = 0x5010_B009,
    /// Unlinking failed.
    LlmUnlinkFailed = 0x5010_B00A,
    /// Could not notify the server side of an unlink.
    LlmNotifyPromptUnlinkFailed = 0x5010_B00B,
    /// Too many clusters in one call (v1).
    LlmClusterNumExceedLimit = 0x5010_B00C,
    /// A link or unlink is already in progress.
    LlmProcessingLink = 0x5010_B00D,
    /// Device memory exhausted.
    LlmDeviceOutOfMemory = 0x5010_B00E,
    /// Prefix id already loaded.
    LlmPrefixAlreadyExist = 0x5010_B00F,
    /// Prefix id unknown.
    LlmPrefixNotExist = 0x5010_B010,
    /// Legacy (spelled as in the reference).
    LlmSeqLenOverLimit = 0x5010_B011,
    /// Legacy.
    LlmNoFreeBlock = 0x5010_B012,
    /// Legacy.
    LlmBlocksOutOfMemory = 0x5010_B013,
    /// `switch_role` while links exist.
    LlmExistLink = 0x5010_B018,
    /// A feature or option is not enabled.
    LlmFeatureNotEnabled = 0x5010_B019,
    /// A transfer or socket operation exceeded its timeout.
    LlmTimeout = 0x5010_B01A,
    /// Conflicting concurrent use of a link.
    LlmLinkBusy = 0x5010_B01B,
    /// Memory pool or system memory exhausted.
    LlmOutOfMemory = 0x5010_B01C,
    /// Device memory error (ACL_ERROR_RT_DEVICE_MEM_ERROR).
    LlmDeviceMemError = 507_053,
    /// Suspected remote memory fault.
    LlmSuspectRemoteError = 507_057,
    /// Unknown error.
    LlmUnknownError = -1,
}

impl LlmStatusCode {
    /// Every code, for lookups by value.
    pub const ALL: [LlmStatusCode; 29] = [
        Self::LlmSuccess,
        Self::LlmFailed,
        Self::LlmWaitProcessTimeout,
        Self::LlmKvCacheNotExist,
        Self::LlmRepeatRequest,
        Self::LlmRequestAlreadyCompleted,
        Self::LlmParamInvalid,
        Self::LlmEngineFinalized,
        Self::LlmNotYetLink,
        Self::LlmAlreadyLink,
        Self::LlmLinkFailed,
        Self::LlmUnlinkFailed,
        Self::LlmNotifyPromptUnlinkFailed,
        Self::LlmClusterNumExceedLimit,
        Self::LlmProcessingLink,
        Self::LlmDeviceOutOfMemory,
        Self::LlmPrefixAlreadyExist,
        Self::LlmPrefixNotExist,
        Self::LlmSeqLenOverLimit,
        Self::LlmNoFreeBlock,
        Self::LlmBlocksOutOfMemory,
        Self::LlmExistLink,
        Self::LlmFeatureNotEnabled,
        Self::LlmTimeout,
        Self::LlmLinkBusy,
        Self::LlmOutOfMemory,
        Self::LlmDeviceMemError,
        Self::LlmSuspectRemoteError,
        Self::LlmUnknownError,
    ];

    /// The numeric value, as the Python enum has it.
    pub fn value(self) -> i64 {
        self as i64
    }

    /// Maps a native value to its code; unknown values become `LlmFailed`, as in the reference.
    pub fn from_value(value: i64) -> Self {
        Self::ALL
            .into_iter()
            .find(|c| c.value() == value)
            .unwrap_or(Self::LlmFailed)
    }

    /// The reference's upper-case name, e.g. `LLM_NOT_YET_LINK`.
    pub fn name(self) -> &'static str {
        match self {
            Self::LlmSuccess => "LLM_SUCCESS",
            Self::LlmFailed => "LLM_FAILED",
            Self::LlmWaitProcessTimeout => "LLM_WAIT_PROCESS_TIMEOUT",
            Self::LlmKvCacheNotExist => "LLM_KV_CACHE_NOT_EXIST",
            Self::LlmRepeatRequest => "LLM_REPEAT_REQUEST",
            Self::LlmRequestAlreadyCompleted => "LLM_REQUEST_ALREADY_COMPLETED",
            Self::LlmParamInvalid => "LLM_PARAM_INVALID",
            Self::LlmEngineFinalized => "LLM_ENGINE_FINALIZED",
            Self::LlmNotYetLink => "LLM_NOT_YET_LINK",
            Self::LlmAlreadyLink => "LLM_ALREADY_LINK",
            Self::LlmLinkFailed => "LLM_LINK_FAILED",
            Self::LlmUnlinkFailed => "LLM_UNLINK_FAILED",
            Self::LlmNotifyPromptUnlinkFailed => "LLM_NOTIFY_PROMPT_UNLINK_FAILED",
            Self::LlmClusterNumExceedLimit => "LLM_CLUSTER_NUM_EXCEED_LIMIT",
            Self::LlmProcessingLink => "LLM_PROCESSING_LINK",
            Self::LlmDeviceOutOfMemory => "LLM_DEVICE_OUT_OF_MEMORY",
            Self::LlmPrefixAlreadyExist => "LLM_PREFIX_ALREADY_EXIST",
            Self::LlmPrefixNotExist => "LLM_PREFIX_NOT_EXIST",
            Self::LlmSeqLenOverLimit => "LLM_SEQ_LENOVERLIMIT",
            Self::LlmNoFreeBlock => "LLM_NO_FREE_BLOCK",
            Self::LlmBlocksOutOfMemory => "LLM_BLOCKS_OUT_OF_MEMORY",
            Self::LlmExistLink => "LLM_EXIST_LINK",
            Self::LlmFeatureNotEnabled => "LLM_FEATURE_NOT_ENABLED",
            Self::LlmTimeout => "LLM_TIMEOUT",
            Self::LlmLinkBusy => "LLM_LINK_BUSY",
            Self::LlmOutOfMemory => "LLM_OUT_OF_MEMORY",
            Self::LlmDeviceMemError => "LLM_DEVICE_MEM_ERROR",
            Self::LlmSuspectRemoteError => "LLM_SUSPECT_REMOTE_ERROR",
            Self::LlmUnknownError => "LLM_UNKNOWN_ERROR",
        }
    }

    /// Codes that callers (omni-infer) retry rather than treat as fatal.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::LlmRepeatRequest
                | Self::LlmClusterNumExceedLimit
                | Self::LlmProcessingLink
                | Self::LlmDeviceOutOfMemory
                | Self::LlmTimeout
                | Self::LlmWaitProcessTimeout
                | Self::LlmLinkBusy
        )
    }
}

impl fmt::Display for LlmStatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LLMStatusCode.{}", self.name())
    }
}

/// The error every fallible call returns: a status code and what went wrong.
///
/// Python raises `TypeError`/`ValueError` for argument checks; Rust's types make most of those
/// impossible, and the remaining range checks surface as `LLM_PARAM_INVALID` here.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{message}, error code is {status_code}")]
pub struct LlmException {
    /// The status code.
    pub status_code: LlmStatusCode,
    /// What failed and why.
    pub message: String,
}

impl LlmException {
    /// An exception with `code` and a message.
    pub fn new(status_code: LlmStatusCode, message: impl Into<String>) -> Self {
        Self {
            status_code,
            message: message.into(),
        }
    }

    /// `LLM_PARAM_INVALID` with a message.
    pub fn param(message: impl Into<String>) -> Self {
        Self::new(LlmStatusCode::LlmParamInvalid, message)
    }
}

/// Result alias for the library.
pub type Result<T, E = LlmException> = std::result::Result<T, E>;

/// Shorthand for an early `LLM_PARAM_INVALID` return.
macro_rules! param_invalid {
    ($($arg:tt)*) => {
        return Err($crate::status::LlmException::param(format!($($arg)*)))
    };
}
pub(crate) use param_invalid;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_match_reference() {
        assert_eq!(LlmStatusCode::LlmNotYetLink.value(), 1_343_270_919);
        assert_eq!(LlmStatusCode::LlmExistLink.value(), 1_343_270_936);
        assert_eq!(LlmStatusCode::LlmOutOfMemory.value(), 1_343_270_940);
        assert_eq!(LlmStatusCode::LlmFailed.value(), 4_294_967_295);
        for code in LlmStatusCode::ALL {
            assert_eq!(LlmStatusCode::from_value(code.value()), code);
        }
        // Internal codes such as CACHE_KEY_ALREADY_EXIST surface as LLM_FAILED.
        assert_eq!(
            LlmStatusCode::from_value(0x5010_B015),
            LlmStatusCode::LlmFailed
        );
    }
}
