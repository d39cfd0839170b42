package main

import (
	"context"
	_ "embed"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// kwokStages is the node and pod lifecycle kwok plays.
//
//go:embed kwok-stages.yaml
var kwokStages []byte

// options say which storage server the control plane runs on and where the
// binaries are.
type options struct {
	backend    string // pgetcd, etcd or kine
	dir        string // the run's working directory (wiped at start)
	bin        string // kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, kine
	pgetcd     string
	etcd       string
	testPG     string // pgetcd-test-postgres, for kine's Postgres
	compaction time.Duration
	eventTTL   time.Duration
	apiArgs    []string // more kube-apiserver flags
	// instances > 0: that many pgetcd processes on one keyspace of one
	// throwaway Postgres (ha.go), instead of one pgetcd with its managed
	// Postgres.
	instances int
	// The instances' --watch-progress-notify-interval; 0 leaves pgetcd's
	// default (10m, etcd's).
	progressNotify time.Duration
	// routeEvents: pgetcd serves a second keyspace, events, with a listener
	// of its own, and its main listener (kube-apiserver's only endpoint)
	// routes /registry/events/ to it (--route-prefix).
	routeEvents bool
	// eventsKeyspace: pgetcd serves keyspace "main" on one throwaway Postgres
	// and "events" on another, each on its own listener (shard.go), instead
	// of one keyspace on its managed Postgres.
	eventsKeyspace bool
	// eventsNoFsync: the events keyspace's Postgres runs with fsync off (a
	// diagnostic: does main's latency under a storm come from the disk?).
	eventsNoFsync bool
	// overrides: the resources kube-apiserver sends to the events keyspace
	// (--etcd-servers-overrides), as group/resource.
	overrides []string
}

// cluster is a running control plane: a storage server, kube-apiserver over
// mutual TLS to it, kube-controller-manager, kube-scheduler and kwok.
type cluster struct {
	opts       options
	pki        *pki
	storage    *proc
	postgres   *proc     // kine's Postgres, the one the pgetcd instances share, or main's
	members    []*member // with instances > 0; storage is nil then
	storageURL string    // the endpoints, comma-separated
	metricsURL string    // the storage server's /metrics
	dataDir    string    // what "size on disk" measures

	// With eventsKeyspace: the events keyspace's Postgres; with it or with
	// routeEvents: the events keyspace's own listener.
	eventsPostgres *proc
	eventsURL      string

	apiserver, controllers, scheduler, kwok *proc
	apiURL                                  string
	kubeconfig                              string
	config                                  *rest.Config
	client                                  kubernetes.Interface
}

func (c *cluster) path(name string) string { return filepath.Join(c.opts.dir, name) }

func startCluster(ctx context.Context, o options) (*cluster, error) {
	if err := os.RemoveAll(o.dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.dir, 0o755); err != nil {
		return nil, err
	}
	c := &cluster{opts: o}
	var err error
	if c.pki, err = newPKI(c.path("pki")); err != nil {
		return nil, err
	}
	for _, cert := range [][]string{
		{"storage", "storage"},
		{"apiserver-etcd-client", "kube-apiserver-etcd-client"},
		{"apiserver", "kube-apiserver"},
		{"admin", "admin", "system:masters"},
	} {
		if err := c.pki.issue(cert[0], cert[1], cert[2:]...); err != nil {
			return nil, err
		}
	}
	if err := c.startStorage(ctx); err != nil {
		return nil, err
	}
	if err := c.startKubernetes(ctx); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

// startStorage starts the storage server of the chosen backend on fresh
// ports and waits until it serves.
func (c *cluster) startStorage(ctx context.Context) error {
	if c.opts.instances > 0 {
		if c.opts.backend != "pgetcd" {
			return fmt.Errorf("several instances of %s: only pgetcd", c.opts.backend)
		}
		return c.startMembers(ctx)
	}
	if c.opts.eventsKeyspace {
		if c.opts.backend != "pgetcd" {
			return fmt.Errorf("an events keyspace on %s: only pgetcd", c.opts.backend)
		}
		return c.startShardStorage(ctx)
	}
	port, mport := freePort(), freePort()
	c.storageURL = "https://127.0.0.1:" + strconv.Itoa(port)
	c.metricsURL = "http://127.0.0.1:" + strconv.Itoa(mport) + "/metrics"
	p := c.pki.path
	var args []string
	switch c.opts.backend {
	case "pgetcd":
		c.dataDir = c.path("pgetcd")
		args = []string{c.opts.pgetcd,
			"--data-dir", c.dataDir,
			"--listen-client-urls", c.storageURL, "--advertise-client-urls", c.storageURL,
			"--listen-metrics-urls", "http://127.0.0.1:" + strconv.Itoa(mport),
			"--cert-file", p("storage.crt"), "--key-file", p("storage.key"),
			"--trusted-ca-file", p("ca.crt"), "--client-cert-auth",
		}
		if c.opts.routeEvents {
			c.eventsURL = "https://127.0.0.1:" + strconv.Itoa(freePort())
			args = append(args,
				"--serve-keyspace", "name=events listen-client-urls="+c.eventsURL,
				"--route-prefix", "/registry/events/=events")
		}
	case "etcd":
		c.dataDir = c.path("etcd")
		peer := "http://127.0.0.1:" + strconv.Itoa(freePort())
		args = []string{c.opts.etcd,
			"--data-dir", c.dataDir,
			"--listen-client-urls", c.storageURL, "--advertise-client-urls", c.storageURL,
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--initial-cluster", "default=" + peer,
			"--listen-metrics-urls", "http://127.0.0.1:" + strconv.Itoa(mport),
			"--cert-file", p("storage.crt"), "--key-file", p("storage.key"),
			"--trusted-ca-file", p("ca.crt"), "--client-cert-auth",
			"--quota-backend-bytes", strconv.Itoa(8 << 30),
		}
	case "kine":
		url, err := c.startPostgres()
		if err != nil {
			return err
		}
		args = []string{filepath.Join(c.opts.bin, "kine"),
			"--endpoint", url + "?sslmode=disable",
			"--listen-address", strings.TrimPrefix(c.storageURL, "https://"),
			"--metrics-bind-address", "127.0.0.1:" + strconv.Itoa(mport),
			"--server-cert-file", p("storage.crt"), "--server-key-file", p("storage.key"),
			"--trusted-ca-file", p("ca.crt"),
		}
	default:
		return fmt.Errorf("unknown backend %q (pgetcd, etcd or kine)", c.opts.backend)
	}
	var err error
	if c.storage, err = startProc(c.opts.dir, c.opts.backend, args...); err != nil {
		return err
	}
	return c.waitStorage(ctx)
}

// waitStorage waits until the storage server answers a read.
func (c *cluster) waitStorage(ctx context.Context) error {
	return waitFor(ctx, c.opts.backend+" serving", 60*time.Second, func() error {
		if !c.storage.running() {
			return fmt.Errorf("%s exited:\n%s", c.opts.backend, c.storage.tail(20))
		}
		return c.storageHealthy(ctx)
	})
}

// startPostgres starts the Postgres kine (or several pgetcd instances) runs
// on: the same durable throwaway
// cluster settings pgetcd's harnesses use, the same server version.
func (c *cluster) startPostgres() (string, error) {
	c.dataDir = c.path("postgres")
	var url string
	var err error
	c.postgres, url, err = c.throwawayPostgres("postgres", true)
	return url, err
}

// throwawayPostgres starts one throwaway Postgres cluster in dir/NAME (its
// own port and data directory; its log is dir/NAME.log), durable (fsync and
// synchronous commit on) or not, and returns it with its URL once it accepts
// connections.
func (c *cluster) throwawayPostgres(name string, durable bool) (*proc, string, error) {
	args := []string{c.opts.testPG, c.path(name)}
	if durable {
		args = append(args, "--durable")
	}
	p, err := startProc(c.opts.dir, name, args...)
	if err != nil {
		return nil, "", err
	}
	var url string
	err = waitFor(context.Background(), name, 60*time.Second, func() error {
		data, _ := os.ReadFile(p.log)
		for _, line := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(line, "postgres://") {
				url = line
				return nil
			}
		}
		if !p.running() {
			return fmt.Errorf("exited:\n%s", p.tail(20))
		}
		return fmt.Errorf("no URL yet")
	})
	return p, url, err
}

// restartStorage stops the storage server (SIGTERM) and starts it again with
// the same command line (ports and data), under the running apiserver.
func (c *cluster) restartStorage(ctx context.Context) error {
	c.storage.stop()
	if err := c.storage.start(); err != nil {
		return err
	}
	return c.waitStorage(ctx)
}

func (c *cluster) startKubernetes(ctx context.Context) error {
	p := c.pki.path
	aport := freePort()
	c.apiURL = "https://127.0.0.1:" + strconv.Itoa(aport)
	c.kubeconfig = c.path("admin.kubeconfig")
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster: {server: %q, certificate-authority: %q}
users:
- name: admin
  user: {client-certificate: %q, client-key: %q}
contexts:
- name: harness
  context: {cluster: harness, user: admin}
current-context: harness
`, c.apiURL, p("ca.crt"), p("admin.crt"), p("admin.key"))
	if err := os.WriteFile(c.kubeconfig, []byte(kubeconfig), 0o600); err != nil {
		return err
	}
	bin := func(name string) string { return filepath.Join(c.opts.bin, name) }
	etcd := []string{"--etcd-servers", c.storageURL}
	if strings.HasPrefix(c.storageURL, "https://") {
		etcd = append(etcd,
			"--etcd-cafile", p("ca.crt"),
			"--etcd-certfile", p("apiserver-etcd-client.crt"),
			"--etcd-keyfile", p("apiserver-etcd-client.key"))
	}
	if len(c.opts.overrides) > 0 {
		etcd = append(etcd, "--etcd-servers-overrides", c.serversOverrides())
	}
	args := append([]string{bin("kube-apiserver")}, etcd...)
	args = append(args,
		"--etcd-compaction-interval", c.opts.compaction.String(),
		"--event-ttl", c.opts.eventTTL.String(),
		"--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", strconv.Itoa(aport),
		"--cert-dir", c.path("apiserver-certs"),
		"--tls-cert-file", p("apiserver.crt"), "--tls-private-key-file", p("apiserver.key"),
		"--client-ca-file", p("ca.crt"),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", p("sa.pub"),
		"--service-account-signing-key-file", p("sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--authorization-mode", "Node,RBAC",
		"--max-requests-inflight", "800", "--max-mutating-requests-inflight", "400",
	)
	var err error
	c.apiserver, err = startProc(c.opts.dir, "kube-apiserver", append(args, c.opts.apiArgs...)...)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, "kube-apiserver ready", 120*time.Second, func() error {
		if !c.apiserver.running() {
			return fmt.Errorf("kube-apiserver exited:\n%s", c.apiserver.tail(30))
		}
		_, err := httpsGet(c.pki, c.apiURL+"/readyz")
		return err
	}); err != nil {
		return err
	}
	if c.config, err = clientcmd.BuildConfigFromFlags("", c.kubeconfig); err != nil {
		return err
	}
	c.config.QPS, c.config.Burst = 500, 1000
	if c.client, err = kubernetes.NewForConfig(c.config); err != nil {
		return err
	}
	// What the controller manager and the scheduler share: the admin
	// kubeconfig, loopback serving, no leader election, a high client rate.
	component := func(name string, args ...string) []string {
		return append([]string{bin(name),
			"--kubeconfig", c.kubeconfig,
			"--authentication-kubeconfig", c.kubeconfig, "--authorization-kubeconfig", c.kubeconfig,
			"--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(freePort()),
			"--leader-elect=false",
			"--kube-api-qps", "200", "--kube-api-burst", "400",
		}, args...)
	}
	c.controllers, err = startProc(c.opts.dir, "kube-controller-manager", component("kube-controller-manager",
		"--service-account-private-key-file", p("sa.key"),
		"--root-ca-file", p("ca.crt"),
		"--cluster-signing-cert-file", p("ca.crt"),
		"--use-service-account-credentials=false",
		"--controllers", "*",
		"--concurrent-deployment-syncs", "20", "--concurrent-replicaset-syncs", "20",
		"--concurrent-gc-syncs", "40",
	)...)
	if err != nil {
		return err
	}
	c.scheduler, err = startProc(c.opts.dir, "kube-scheduler", component("kube-scheduler")...)
	if err != nil {
		return err
	}
	stages := c.path("kwok-stages.yaml")
	if err := os.WriteFile(stages, kwokStages, 0o644); err != nil {
		return err
	}
	c.kwok, err = startProc(c.opts.dir, "kwok", bin("kwok"),
		"--kubeconfig", c.kubeconfig,
		"--config", stages,
		"--cidr", "10.128.0.0/10",
		"--node-lease-duration-seconds", "40",
		"--manage-all-nodes=false",
		"--manage-nodes-with-annotation-selector", kwokAnnotation+"=fake",
		"--server-address", "127.0.0.1:"+strconv.Itoa(freePort()),
	)
	return err
}

// stop ends every process, the apiserver's clients first.
func (c *cluster) stop() {
	procs := []*proc{c.kwok, c.scheduler, c.controllers, c.apiserver, c.storage}
	for _, m := range c.members {
		procs = append(procs, m.proc)
	}
	for _, p := range append(procs, c.postgres, c.eventsPostgres) {
		p.stop()
	}
}
