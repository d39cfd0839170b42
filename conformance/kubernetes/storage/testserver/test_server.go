// Package testserver stands in for k8s.io/apiserver/pkg/storage/etcd3/testserver
// when kube-apiserver's storage tests run against an external etcd endpoint.
//
// The storage tests call NewTestConfig and RunEtcd to get a client of a fresh,
// empty store. The original starts an embedded etcd; this one starts a separate
// process per call and connects to it:
//
//   - STORAGE_BACKEND=pgetcd: a pgetcd process (PGETCD_BIN) on the Postgres at
//     PGETCD_TEST_POSTGRES_URL, in a keyspace of its own, dropped with its
//     replication slot and publication when the test ends;
//   - STORAGE_BACKEND=etcd: a real etcd process (ETCD_BIN) in a temporary data
//     directory, the reference the same tests are compared against.
//
// Both get the test's WatchProgressNotifyInterval. ../run.sh builds the suites
// with this file in place of the original; it lives in our module too, so
// that go.sum covers what it imports.
package testserver

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
)

// NewTestConfig returns the configuration RunEtcd reads. Of its fields only
// WatchProgressNotifyInterval reaches the server; the tests set nothing else.
func NewTestConfig(t testing.TB) *embed.Config {
	return embed.NewConfig()
}

var keyspaces atomic.Int64

// RunEtcd starts a fresh server of STORAGE_BACKEND and returns a client of it,
// with the KV and Kubernetes interfaces wrapped in the recorders the tests
// inspect. The server stops when the test ends.
func RunEtcd(t testing.TB, cfg *embed.Config) *kubernetes.Client {
	t.Helper()
	if cfg == nil {
		cfg = NewTestConfig(t)
	}
	port := freePort(t)
	clientURL := "http://127.0.0.1:" + strconv.Itoa(port)
	progress := cfg.WatchProgressNotifyInterval.String()

	var cmd *exec.Cmd
	switch backend := os.Getenv("STORAGE_BACKEND"); backend {
	case "pgetcd":
		pg := mustEnv(t, "PGETCD_TEST_POSTGRES_URL")
		keyspace := fmt.Sprintf("k8s_%d_%d", os.Getpid(), keyspaces.Add(1))
		cmd = exec.Command(mustEnv(t, "PGETCD_BIN"),
			"--postgres-url", pg,
			"--keyspace", keyspace,
			"--listen-client-urls", clientURL,
			"--listen-metrics-urls", "http://127.0.0.1:"+strconv.Itoa(freePort(t)),
			"--watch-progress-notify-interval", progress,
			"--log-level", "warn",
		)
		t.Cleanup(func() { dropKeyspace(t, pg, keyspace) })
	case "etcd":
		dir := t.TempDir()
		peerURL := "http://127.0.0.1:" + strconv.Itoa(freePort(t))
		cmd = exec.Command(mustEnv(t, "ETCD_BIN"),
			"--data-dir", filepath.Join(dir, "etcd"),
			"--listen-client-urls", clientURL,
			"--advertise-client-urls", clientURL,
			"--listen-peer-urls", peerURL,
			"--initial-advertise-peer-urls", peerURL,
			"--initial-cluster", "default="+peerURL,
			"--unsafe-no-fsync",
			"--experimental-watch-progress-notify-interval", progress,
			"--log-level", "error",
		)
	default:
		t.Fatalf("STORAGE_BACKEND must be pgetcd or etcd, not %q", backend)
	}
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", cmd.Path, err)
	}
	// Registered after dropKeyspace, so it runs first: the server stops before
	// its keyspace is dropped.
	t.Cleanup(func() { stop(cmd) })

	client, err := kubernetes.New(clientv3.Config{
		Endpoints:   []string{clientURL},
		DialTimeout: 30 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithBlock()},
		Logger:      zaptest.NewLogger(t, zaptest.Level(zapcore.ErrorLevel)).Named("etcd-client"),
	})
	if err != nil {
		t.Fatalf("connecting to %s: %v", clientURL, err)
	}
	t.Cleanup(func() { _ = client.Close() })
	waitReady(t, client)
	client.KV = storagetesting.NewKVRecorder(client.KV)
	client.Kubernetes = storagetesting.NewKubernetesRecorder(client.Kubernetes)
	return client
}

// waitReady waits until the server answers a linearizable read.
func waitReady(t testing.TB, c *kubernetes.Client) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Get(ctx, "/health-probe", kubernetes.GetOptions{})
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not ready: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop asks the server to exit and waits for it, killing it after 10 s.
func stop(cmd *exec.Cmd) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// dropKeyspace removes what pgetcd created for the keyspace: its schema, and
// the logical replication slot and publication named after it.
func dropKeyspace(t testing.TB, pg, keyspace string) {
	sql := fmt.Sprintf(`SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'pgetcd_%[1]s';
DROP PUBLICATION IF EXISTS pgetcd_%[1]s;
DROP SCHEMA IF EXISTS %[1]s CASCADE;`, keyspace)
	out, err := exec.Command("psql", pg, "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql).CombinedOutput()
	if err != nil {
		t.Errorf("dropping keyspace %s: %v: %s", keyspace, err, out)
	}
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func mustEnv(t testing.TB, name string) string {
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set (run the suite through conformance/kubernetes/storage/run.sh)", name)
	}
	return v
}
