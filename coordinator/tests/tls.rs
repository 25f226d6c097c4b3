//! TLS of the gRPC API over real loopback connections, with certificates generated at test time
//! (`rcgen`): clients that trust the coordinator's CA are served; plaintext clients, clients that
//! trust another CA and (under mutual TLS) clients without a certificate signed by the client CA
//! are refused; bad certificate material is refused before the server listens.

use shoal_coordinator::actor::Control;
use shoal_coordinator::grpc::{self, Tls};
use shoal_coordinator::store::EmbeddedStore;
use shoal_proto::v1 as pb;
use shoal_proto::v1::cluster_service_client::ClusterServiceClient;
use shoal_proto::v1::job_service_client::JobServiceClient;
use shoal_tests::certs::{Leaf, TestCa as Ca};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn server_tls(ca: &Ca, client_ca: Option<&Ca>) -> Tls {
    let leaf = ca.server();
    Tls {
        cert_pem: leaf.cert.into_bytes(),
        key_pem: leaf.key.into_bytes(),
        client_ca_pem: client_ca.map(|c| c.pem.clone().into_bytes()),
    }
}

/// A coordinator serving with `tls` on a free loopback port; returns its port and the store's
/// directory (kept alive by the caller).
async fn start(tls: Tls) -> (u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("c.redb")).expect("store");
    let (control, _actor) = Control::start(store).await.expect("control");
    let listener = grpc::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        grpc::serve_with(listener, control, None, Some(tls), std::future::pending())
            .await
            .expect("serve");
    });
    (port, dir)
}

/// Connects to `url`, over TLS trusting `ca` when given (with `identity` for mutual TLS).
async fn connect(
    url: &str,
    ca: Option<&Ca>,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut ep = Endpoint::from_shared(url.to_string())?;
    if let Some(ca) = ca {
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem));
        if let Some(id) = identity {
            cfg = cfg.identity(Identity::from_pem(&id.cert, &id.key));
        }
        ep = ep.tls_config(cfg)?;
    }
    ep.connect().await
}

fn spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.into(),
        model: "tiny".into(),
        ..Default::default()
    }
}

/// Why a client was not served.
#[derive(Debug, PartialEq)]
enum Refused {
    /// The connection (TCP, TLS handshake) failed: the error and its sources.
    Connect(String),
    /// A call failed with this code.
    Call(Code),
}

/// Submits a job through `url` and reads it back.
async fn submit_and_get(
    url: &str,
    ca: Option<&Ca>,
    identity: Option<&Leaf>,
    name: &str,
) -> Result<String, Refused> {
    let channel = connect(url, ca, identity)
        .await
        .map_err(|e| Refused::Connect(shoal_proto::transport::error_chain(&e)))?;
    let mut c = JobServiceClient::new(channel);
    let id = c
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec(name)),
        })
        .await
        .map_err(|s| Refused::Call(s.code()))?
        .into_inner()
        .job_id;
    let job = c
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .map_err(|s| Refused::Call(s.code()))?
        .into_inner();
    assert_eq!(job.spec.map(|s| s.name).as_deref(), Some(name));
    Ok(id)
}

async fn job_names(url: &str, ca: &Ca, identity: Option<&Leaf>) -> Vec<String> {
    let channel = connect(url, Some(ca), identity).await.expect("connect");
    let mut names: Vec<String> = JobServiceClient::new(channel)
        .list_jobs(pb::ListJobsRequest { states: vec![] })
        .await
        .expect("list")
        .into_inner()
        .jobs
        .into_iter()
        .filter_map(|j| j.spec.map(|s| s.name))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_coordinator_serves_only_clients_that_trust_its_ca() {
    let ca = Ca::new("shoal test ca");
    let (port, _dir) = start(server_tls(&ca, None)).await;
    let by_name = format!("https://localhost:{port}");
    let by_ip = format!("https://127.0.0.1:{port}");

    // Trusting the CA: served, by DNS name and by IP address (both are in the certificate).
    submit_and_get(&by_name, Some(&ca), None, "by-name")
        .await
        .expect("a client trusting the CA is served");
    submit_and_get(&by_ip, Some(&ca), None, "by-ip")
        .await
        .expect("a client trusting the CA is served by IP address");

    // Plaintext against the TLS port: the server drops the connection, nothing reaches the API.
    // Whether the client sees the broken connection as Unknown or Cancelled is a race inside
    // hyper (it varies from run to run), so either is accepted; an answer from the API is not.
    let plain = submit_and_get(&format!("http://127.0.0.1:{port}"), None, None, "plain").await;
    assert!(
        matches!(plain, Err(Refused::Call(Code::Unknown | Code::Cancelled))),
        "{plain:?}"
    );

    // Trusting another CA: the server's certificate does not verify.
    let other = Ca::new("another ca");
    let wrong = submit_and_get(&by_name, Some(&other), None, "wrong-ca").await;
    assert!(
        matches!(&wrong, Err(Refused::Connect(e)) if e.contains("UnknownIssuer")),
        "{wrong:?}"
    );

    // A certificate for another name than the one expected does not verify either.
    let cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("coordinator.elsewhere");
    let elsewhere = Endpoint::from_shared(by_ip.clone())
        .expect("url")
        .tls_config(cfg)
        .expect("tls config")
        .connect()
        .await;
    let elsewhere = elsewhere.map_err(|e| shoal_proto::transport::error_chain(&e));
    assert!(
        matches!(&elsewhere, Err(e) if e.contains("not valid for name \"coordinator.elsewhere\"")),
        "{elsewhere:?}"
    );

    // The server still answers, and only the trusted clients' jobs exist.
    assert_eq!(job_names(&by_name, &ca, None).await, ["by-ip", "by-name"]);
    let channel = connect(&by_ip, Some(&ca), None).await.expect("connect");
    ClusterServiceClient::new(channel)
        .list_nodes(pb::ListNodesRequest {})
        .await
        .expect("the cluster service is served over TLS too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_from_the_client_ca() {
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let (port, _dir) = start(server_tls(&server_ca, Some(&client_ca))).await;
    let url = format!("https://localhost:{port}");

    let good = client_ca.client("agent-1");
    submit_and_get(&url, Some(&server_ca), Some(&good), "with-cert")
        .await
        .expect("a client with a certificate from the client CA is served");

    let none = submit_and_get(&url, Some(&server_ca), None, "no-cert").await;
    // Under TLS 1.3 the client finishes its handshake before the server checks its certificate,
    // so the refusal arrives as a broken connection on the first call (Unknown or Cancelled,
    // which one is a race inside hyper).
    let broken = |r: &Result<String, Refused>| {
        matches!(r, Err(Refused::Call(Code::Unknown | Code::Cancelled)))
    };
    assert!(broken(&none), "a client without a certificate: {none:?}");

    let stranger = Ca::new("stranger").client("agent-2");
    let foreign = submit_and_get(&url, Some(&server_ca), Some(&stranger), "foreign").await;
    assert!(
        broken(&foreign),
        "a certificate from another CA: {foreign:?}"
    );

    assert_eq!(
        job_names(&url, &server_ca, Some(&good)).await,
        ["with-cert"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_material_is_refused_before_serving() {
    let ca = Ca::new("ca");
    let a = ca.server();
    let b = ca.server();
    let good = Tls {
        cert_pem: a.cert.clone().into_bytes(),
        key_pem: a.key.clone().into_bytes(),
        client_ca_pem: None,
    };
    good.check().expect("a matching certificate and key");
    assert!(!format!("{good:?}").contains("PRIVATE KEY"), "{good:?}");

    let mismatched = Tls {
        key_pem: b.key.into_bytes(),
        ..good.clone()
    };
    let e = mismatched.check().unwrap_err().to_string();
    assert!(e.starts_with("tls:"), "{e}");

    let not_a_cert = Tls {
        cert_pem: b"hello".to_vec(),
        ..good.clone()
    };
    let e = not_a_cert.check().unwrap_err().to_string();
    assert_eq!(e, "tls certificate: no PEM CERTIFICATE block");

    // The certificate where the key belongs.
    let swapped = Tls {
        cert_pem: a.key.clone().into_bytes(),
        key_pem: a.cert.clone().into_bytes(),
        client_ca_pem: None,
    };
    assert!(swapped.check().is_err());

    let bad_client_ca = Tls {
        client_ca_pem: Some(b"not a ca".to_vec()),
        ..good.clone()
    };
    let e = bad_client_ca.check().unwrap_err().to_string();
    assert_eq!(e, "tls client ca: no PEM CERTIFICATE block");

    // serve_with refuses it too, before serving anything.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("c.redb")).expect("store");
    let (control, _actor) = Control::start(store).await.expect("control");
    let listener = grpc::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let e = grpc::serve_with(
        listener,
        control,
        None,
        Some(mismatched),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().starts_with("tls:"), "{e}");
}
