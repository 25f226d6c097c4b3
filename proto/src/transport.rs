//! What both ends of the gRPC transport need: readable transport errors and a check of TLS
//! material before it is handed to rustls (whose own errors say little).

/// `e` and its sources, joined with `: ` (tonic's transport errors say little at the top); a
/// source an error already printed is not repeated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// Whether `pem` holds a `-----BEGIN <label>-----` block (`CERTIFICATE`, `PRIVATE KEY`, ...).
pub fn pem_has(pem: &[u8], label: &str) -> bool {
    let begin = format!("-----BEGIN {label}-----");
    pem.windows(begin.len()).any(|w| w == begin.as_bytes())
}

/// A call's failure explained for people: a connection the coordinator closed at once (the
/// transport failed, the API never answered) is most often a TLS mismatch, so say so.
pub fn explain(s: &tonic::Status) -> String {
    use std::error::Error;
    if s.source().is_some() && matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled) {
        format!(
            "{}: the coordinator closed the connection (one serving TLS needs an https:// URL \
             and --tls-ca; one requiring client certificates also --tls-cert and --tls-key)",
            s.message()
        )
    } else {
        s.message().to_string()
    }
}

/// The `authorization` metadata value for a bearer token.
pub fn bearer(
    token: &str,
) -> Result<
    tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    tonic::metadata::errors::InvalidMetadataValue,
> {
    format!("Bearer {token}").parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn chains_join_sources_once_and_pem_blocks_are_found() {
        let inner = E("refused", None);
        let e = E(
            "transport error",
            Some(Box::new(E("connect: refused", Some(Box::new(inner))))),
        );
        assert_eq!(error_chain(&e), "transport error: connect: refused");
        assert!(pem_has(
            b"x\n-----BEGIN CERTIFICATE-----\nAA",
            "CERTIFICATE"
        ));
        assert!(!pem_has(b"-----BEGIN PRIVATE KEY-----", "CERTIFICATE"));
    }
}
