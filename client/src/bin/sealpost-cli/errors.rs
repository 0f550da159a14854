//! Errors as the user reads them: one line in plain words, never a backtrace, and an exit
//! code (1: the command failed; 2: it was used wrong, which clap reports itself).

use sealpost_client::{ClientError, api::ApiError, conn::ConnError};

/// A failed command: what to print after `error: `.
#[derive(Debug)]
pub(crate) struct CliError {
    message: String,
}

impl CliError {
    /// An error in these words.
    pub(crate) fn msg(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
        }
    }

    /// A client error in words a person acts on.
    pub(crate) fn client(e: ClientError) -> CliError {
        CliError::msg(words(&e))
    }

    /// The same error after what failed ("not sent: …").
    pub(crate) fn context(self, what: &str) -> CliError {
        CliError::msg(format!("{what}: {}", self.message))
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::client(e)
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::msg(e.to_string())
    }
}

/// What a client error means for the user, and what to do.
pub(crate) fn words(e: &ClientError) -> String {
    match e {
        ClientError::DeviceRevoked => "this device was removed from its account: it can no \
             longer send or receive. Link it again (sealpost-cli link) or register anew."
            .into(),
        ClientError::NoDeviceList(user) => format!("there is no account {user}"),
        ClientError::Locked(dir) => format!(
            "another sealpost-cli (listen or daemon) is using {}; while it runs, send, verify, \
             conversations, devices and the other everyday commands go through it, but this \
             one needs it stopped first",
            dir.display()
        ),
        ClientError::MasterKeyChanged { user, .. } => format!(
            "the master key of {user} changed: nothing is sent to them until you accept the \
             new one. See what changed with: sealpost-cli safety-number --with {user}"
        ),
        ClientError::Api(api) => api_words(api),
        ClientError::Conn(ConnError::Transport(detail)) => {
            format!("cannot reach the broker ({detail}); is it running, and is the address right?")
        }
        ClientError::Conn(ConnError::Timeout) => {
            "the broker did not answer in time; try again later".into()
        }
        _ => e.to_string(),
    }
}

fn api_words(e: &ApiError) -> String {
    match e {
        ApiError::Transport(detail) => {
            format!("cannot reach the broker ({detail}); is it running, and is the address right?")
        }
        ApiError::Refused { code, message, .. } => match code.as_str() {
            "unknown_domain" => format!("{message} (no federation with that domain)"),
            "conflict" => "that handle is taken; choose another".into(),
            "unauthorized" => "the broker does not accept this device's credentials: it was \
                 removed from its account, or the state belongs to another broker"
                .into(),
            "rate_limited" => "the broker asks to slow down; try again in a moment".into(),
            "unavailable" => "the broker is unavailable right now; try again later".into(),
            "forbidden" => format!("the broker refused: {message}"),
            _ => format!("the broker refused: {message}"),
        },
        ApiError::BadAnswer(what) => format!(
            "the broker gave an answer this client does not understand (to {what}); is the \
             address that of a Sealpost broker?"
        ),
        _ => e.to_string(),
    }
}
