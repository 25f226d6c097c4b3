//! The dashboard over loopback HTTP against a control actor in process (a fake node session):
//! pages and JSON answer, the actor keeps each job's step curve (a redone step replaces the
//! first run of it), and bad URLs get 404 pages that name what is missing, never a panic.

use shoal_coordinator::actor::{Control, Registration, Session};
use shoal_coordinator::store::EmbeddedStore;
use shoal_proto::v1 as pb;
use shoal_spec::job::JobSpec;
use shoal_tests::http_get;
use tokio::sync::mpsc;

async fn get(url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(&url))
        .await
        .expect("client")
}

fn step(id: &str, n: u64, loss: f64) -> pb::AssignmentStatus {
    pb::AssignmentStatus {
        job_id: id.into(),
        state: pb::JobState::Running as i32,
        started_step: (n == 1).then_some(0),
        step: Some(pb::StepMetrics {
            step: n,
            loss,
            tokens_per_s: 100.0 * n as f64,
            seconds: 0.1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_answer_and_bad_urls_get_404_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    let (control, _actor) = Control::start(store).await.expect("start");
    let (tx, mut rx): (Session, _) = mpsc::channel(64);
    let epoch = control
        .register(
            Registration {
                node: "n1".into(),
                devices: 2,
                models: Vec::new(),
                nvlink_domain: "n1".into(),
                ib_rail: 0,
                spare: false,
                data_addr: String::new(),
                running: Vec::new(),
            },
            tx,
        )
        .await
        .expect("register");
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let mut spec = JobSpec::from_toml("name = \"dash\"", "test").expect("spec");
    spec.parallelism.dp = 2;
    spec.training.batch = 4;
    spec.training.steps = 5;
    let id = control.submit(spec).await.expect("submit");
    for (n, loss) in [(1, 9.0), (2, 8.0), (3, 7.0), (2, 7.5)] {
        control.status("n1", epoch, step(&id, n, loss)).await;
    }
    let s = control.snapshot().await.expect("snapshot");
    let curve: Vec<(u64, f64)> = s.curves[&id].iter().map(|p| (p.step, p.loss)).collect();
    assert_eq!(
        curve,
        vec![(1, 9.0), (2, 7.5)],
        "step 2 redone replaces 2 and 3"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(shoal_coordinator::http::serve(
        listener,
        control.clone(),
        std::future::pending(),
    ));

    let (code, page) = get(format!("{base}/")).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("<b>n1</b>") && page.contains(&format!("href=\"/jobs/{id}\"")));
    let (code, body) = get(format!("{base}/api/cluster")).await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["jobs"][0]["state"], "running", "{v}");
    assert_eq!(v["nodes"][0]["name"], "n1");
    let (code, page) = get(format!("{base}/jobs/{id}")).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("id=\"loss-chart\""));
    assert!(page.contains("data-missing"), "no trace yet, said so");
    let (code, body) = get(format!("{base}/api/jobs/{id}?timeline=1")).await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["curve"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(v["fragments"]["timeline"].is_string());
    let (code, _) = get(format!("{base}/metrics")).await;
    assert_eq!(code, 200);

    let long = format!("/jobs/{}", "x".repeat(4000));
    for (path, says) in [
        ("/jobs/job-999", "no job job-999"),
        ("/jobs/%3Cb%3E", "no job &lt;b&gt;"),
        ("/jobs/%ff", "no such job"),
        ("/jobs/", "nothing at /jobs/"),
        ("/jobs/job-1/extra", "nothing at"),
        ("/nothing", "nothing at /nothing"),
        (long.as_str(), "no job xxx"),
    ] {
        let (code, body) = get(format!("{base}{path}")).await;
        assert_eq!(code, 404, "{path}");
        assert!(body.contains(says), "{path}: {body}");
        assert!(body.contains("<!doctype html>"), "{path}: a page");
    }
    let (code, body) = get(format!("{base}/api/jobs/job-999")).await;
    assert_eq!(code, 404);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json 404");
    assert_eq!(v["error"], "no job job-999");
    let (code, _) = get(format!("{base}/")).await;
    assert_eq!(code, 200, "still serving");
}
