package main

// The keyspace isolation scenario (-shard N): does a storm of Events written
// to one keyspace leave the writes of another alone?
//
// One pgetcd process serves its main keyspace ("main") on one throwaway
// Postgres and a second keyspace ("events") on another, with its own port and
// data directory (--serve-keyspace), each keyspace on its own mutual-TLS
// listener. Each run starts a fresh control plane on it in one of two layouts:
//
//   - single: kube-apiserver has only --etcd-servers (main): Events and Leases
//     land in main with everything else; the events keyspace is served, idle;
//   - sharded: --etcd-servers-overrides sends core events and
//     coordination.k8s.io/leases to the events keyspace's listener.
//
// A run first checks where things land: an Event, a Lease and a ConfigMap
// created through kube-apiserver, their keys read on each listener. Then, for
// the whole run, ConfigMap writers through client-go (each worker updates its
// own ConfigMap by its last resourceVersion, on a connection of their own)
// and a probe writing one key of main straight to pgetcd (an etcd client, a
// Txn on the key's mod revision, as kube-apiserver writes). After a warm-up
// it measures a quiet window, then starts the storm and, after a ramp, a
// storm window. The storm creates Events either through kube-apiserver
// (-shard-storm apiserver: client-go creates from many goroutines) or straight
// at the keyspace Events go to in that layout (-shard-storm loadgen: loadgen's
// k8s workload with only its event creates, each a Txn with a lease).
//
// Per window: the client latencies; kube-apiserver's histograms of the
// ConfigMap update and of its storage call for it; pgetcd's Txn and commit
// histograms of each keyspace (deltas of /metrics, interpolated in their
// buckets); the storm's achieved rate (new keys under its prefix); the CPU of
// each process and of the rest of the machine; the load average. Layouts
// alternate single, sharded, sharded, single, ... The scenario prints a table
// and the ratio of each layout's storm p99 to its quiet p99, and writes a JSON
// report. It exits 1 only when a run fails or a key is not where it belongs.
//
// -shard-events-fsync=false runs the events keyspace's Postgres without fsync:
// a diagnostic of what the disk both clusters share costs main under a storm.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// shardOptions shape the scenario.
type shardOptions struct {
	runs         int
	storm        string  // apiserver or loadgen
	stormRate    float64 // Events per second the storm aims at
	stormWorkers int     // goroutines of the apiserver storm
	writeRate    float64 // ConfigMap updates per second, over all writers
	writers      int
	probeRate    float64 // direct writes per second to main
	warmup       time.Duration
	window       time.Duration
	ramp         time.Duration // from the storm's start to its window
	loadgen      string
	report       string
	eventsFsync  bool // false: the events keyspace's Postgres without fsync
}

const (
	shardMainKeyspace   = "main"
	shardEventsKeyspace = "events"
	shardLoadNS         = "shard-load"
	shardStormNS        = "shard-storm"
	shardCheckNS        = "shard-check"
	shardProbeKey       = "/shard-probe/key"
	// Where loadgen's k8s workload writes (its root, /loadgen/k8s/<run>/).
	loadgenPrefix = "/loadgen/k8s/"
)

// The resources the sharded layout sends to the events keyspace, as
// --etcd-servers-overrides names them (group/resource, the core group empty).
var shardOverrides = []string{"/events", "coordination.k8s.io/leases"}

// startShardStorage starts the two Postgres clusters and the pgetcd serving
// main on the first and events on the second.
func (c *cluster) startShardStorage(ctx context.Context) error {
	var mainPG, eventsPG string
	var err error
	if c.postgres, mainPG, err = c.throwawayPostgres("pg-main", true); err != nil {
		return err
	}
	if c.eventsPostgres, eventsPG, err = c.throwawayPostgres("pg-events", !c.opts.eventsNoFsync); err != nil {
		return err
	}
	c.dataDir = c.path("pg-main")
	mport := freePort()
	c.storageURL = "https://127.0.0.1:" + strconv.Itoa(freePort())
	c.eventsURL = "https://127.0.0.1:" + strconv.Itoa(freePort())
	c.metricsURL = "http://127.0.0.1:" + strconv.Itoa(mport) + "/metrics"
	p := c.pki.path
	args := []string{c.opts.pgetcd,
		"--keyspace", shardMainKeyspace,
		"--postgres-url", mainPG,
		"--listen-client-urls", c.storageURL, "--advertise-client-urls", c.storageURL,
		"--serve-keyspace", fmt.Sprintf("name=%s listen-client-urls=%s postgres-url=%s",
			shardEventsKeyspace, c.eventsURL, eventsPG),
		"--listen-metrics-urls", "http://127.0.0.1:" + strconv.Itoa(mport),
		"--cert-file", p("storage.crt"), "--key-file", p("storage.key"),
		"--trusted-ca-file", p("ca.crt"), "--client-cert-auth",
	}
	if c.storage, err = startProc(c.opts.dir, "pgetcd", args...); err != nil {
		return err
	}
	if err := c.waitStorage(ctx); err != nil {
		return err
	}
	return waitFor(ctx, "the events keyspace serving", 60*time.Second, func() error {
		cli, err := c.etcdClientAt(c.eventsURL)
		if err != nil {
			return err
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err = cli.Get(ctx, "/registry/health")
		return err
	})
}

// serversOverrides is the --etcd-servers-overrides value of the sharded layout.
func (c *cluster) serversOverrides() string {
	var parts []string
	for _, r := range c.opts.overrides {
		parts = append(parts, r+"#"+c.eventsURL)
	}
	return strings.Join(parts, ",")
}

// placement is where one object's key was found.
type placement struct {
	Key    string `json:"key"`
	Main   bool   `json:"in_main"`
	Events bool   `json:"in_events"`
	Want   string `json:"want"`
}

// checkPlacement creates a ConfigMap, an Event and a Lease through
// kube-apiserver and reads their keys on both listeners: the ConfigMap must
// be in main only; the Event and the Lease in events only when sharded, in
// main only otherwise.
func (c *cluster) checkPlacement(ctx context.Context, sharded bool) ([]placement, error) {
	if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: shardCheckNS}}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	meta := metav1.ObjectMeta{Name: "placed", Namespace: shardCheckNS}
	if _, err := c.client.CoreV1().ConfigMaps(shardCheckNS).Create(ctx, &corev1.ConfigMap{ObjectMeta: meta, Data: map[string]string{"a": "b"}}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	if _, err := c.client.CoreV1().Events(shardCheckNS).Create(ctx, stormEvent(shardCheckNS, "placed", 0), metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	holder, secs := "shard-check", int32(30)
	if _, err := c.client.CoordinationV1().Leases(shardCheckNS).Create(ctx, &coordinationv1.Lease{
		ObjectMeta: meta,
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &secs},
	}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	mainCli, err := c.etcdClientAt(c.storageURL)
	if err != nil {
		return nil, err
	}
	defer mainCli.Close()
	eventsCli, err := c.etcdClientAt(c.eventsURL)
	if err != nil {
		return nil, err
	}
	defer eventsCli.Close()
	has := func(cli *clientv3.Client, key string) (bool, error) {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		resp, err := cli.Get(ctx, key, clientv3.WithCountOnly())
		if err != nil {
			return false, err
		}
		return resp.Count == 1, nil
	}
	var out []placement
	var wrong []string
	for _, k := range []struct {
		key      string
		toEvents bool
	}{
		{"/registry/configmaps/" + shardCheckNS + "/placed", false},
		{"/registry/events/" + shardCheckNS + "/placed", sharded},
		{"/registry/leases/" + shardCheckNS + "/placed", sharded},
	} {
		pl := placement{Key: k.key, Want: shardMainKeyspace}
		if k.toEvents {
			pl.Want = shardEventsKeyspace
		}
		if pl.Main, err = has(mainCli, k.key); err != nil {
			return nil, err
		}
		if pl.Events, err = has(eventsCli, k.key); err != nil {
			return nil, err
		}
		if pl.Main == k.toEvents || pl.Events != k.toEvents {
			wrong = append(wrong, fmt.Sprintf("%s: in main %v, in events %v, want only in %s", k.key, pl.Main, pl.Events, pl.Want))
		}
		out = append(out, pl)
	}
	if len(wrong) > 0 {
		return out, errors.New(strings.Join(wrong, "; "))
	}
	return out, nil
}

func stormEvent(ns, name string, n int) *corev1.Event {
	now := metav1.Now()
	return &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		InvolvedObject: corev1.ObjectReference{
			Kind: "Pod", Namespace: ns, Name: fmt.Sprintf("pod-%d", n%1000), APIVersion: "v1",
		},
		Reason:         "Storm",
		Message:        fmt.Sprintf("event %d of the storm: Back-off restarting failed container app in pod pod-%d_%s", n, n%1000, ns),
		Type:           corev1.EventTypeNormal,
		Source:         corev1.EventSource{Component: "shard-storm"},
		FirstTimestamp: now,
		LastTimestamp:  now,
		Count:          1,
	}
}

// sample is one request's latency and when it ended.
type sample struct {
	end time.Time
	d   time.Duration
	err bool
}

// samples are the requests of one kind, shared by its goroutines.
type samples struct {
	mu  sync.Mutex
	all []sample
}

func (s *samples) add(start time.Time, err error) {
	end := time.Now()
	s.mu.Lock()
	s.all = append(s.all, sample{end: end, d: end.Sub(start), err: err != nil})
	s.mu.Unlock()
}

// window returns the quantiles of the successful requests that ended in
// [from, to), how many failed there, and the successes per second.
func (s *samples) window(from, to time.Time) (quantiles, int, float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ds []time.Duration
	failed := 0
	for _, x := range s.all {
		if x.end.Before(from) || !x.end.Before(to) {
			continue
		}
		if x.err {
			failed++
			continue
		}
		ds = append(ds, x.d)
	}
	return quantilesOf(ds), failed, float64(len(ds)) / to.Sub(from).Seconds()
}

// ownConnection returns a client of kube-apiserver on a TCP connection of its
// own (a config with a dialer is not shared through client-go's transport
// cache), without client-side rate limiting.
func (c *cluster) ownConnection() (kubernetes.Interface, error) {
	cfg := rest.CopyConfig(c.config)
	cfg.Dial = (&net.Dialer{Timeout: 10 * time.Second}).DialContext
	cfg.QPS, cfg.Burst = -1, 0
	return kubernetes.NewForConfig(cfg)
}

// every calls f rate times a second until ctx is done (a tick that finds f
// still running is dropped, so the achieved rate can be lower).
func every(ctx context.Context, rate float64, f func(n int)) {
	tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer tick.Stop()
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		f(n)
	}
}

// writeConfigMaps runs the ConfigMap writers until ctx is done: each creates
// its ConfigMap, then updates it by its last resourceVersion (after a failed
// update it reads the object first).
func (c *cluster) writeConfigMaps(ctx context.Context, o shardOptions, rec *samples) error {
	client, err := c.ownConnection()
	if err != nil {
		return err
	}
	cms := client.CoreV1().ConfigMaps(shardLoadNS)
	pad := strings.Repeat("x", 512)
	var wg sync.WaitGroup
	for w := 0; w < o.writers; w++ {
		name := fmt.Sprintf("writer-%d", w)
		cm, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name}, Data: map[string]string{"seq": "0"}}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rv := cm.ResourceVersion
			every(ctx, o.writeRate/float64(o.writers), func(n int) {
				if rv == "" {
					got, err := cms.Get(ctx, name, metav1.GetOptions{})
					if err != nil {
						return
					}
					rv = got.ResourceVersion
				}
				rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				defer cancel()
				t0 := time.Now()
				got, err := cms.Update(rctx, &corev1.ConfigMap{
					ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: rv},
					Data:       map[string]string{"seq": strconv.Itoa(n + 1), "pad": pad},
				}, metav1.UpdateOptions{})
				if ctx.Err() != nil {
					return
				}
				rec.add(t0, err)
				if err != nil {
					rv = ""
					return
				}
				rv = got.ResourceVersion
			})
		}()
	}
	wg.Wait()
	return nil
}

// probe writes one key of main straight to pgetcd until ctx is done: a Txn
// that puts the key if its mod revision is the one last written, as
// kube-apiserver's updates do.
func (c *cluster) probe(ctx context.Context, rate float64, rec *samples) error {
	cli, err := c.etcdClientAt(c.storageURL)
	if err != nil {
		return err
	}
	defer cli.Close()
	value := strings.Repeat("p", 600)
	var mod int64
	every(ctx, rate, func(int) {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		t0 := time.Now()
		resp, err := cli.Txn(rctx).
			If(clientv3.Compare(clientv3.ModRevision(shardProbeKey), "=", mod)).
			Then(clientv3.OpPut(shardProbeKey, value)).
			Else(clientv3.OpGet(shardProbeKey)).
			Commit()
		if ctx.Err() != nil {
			return
		}
		rec.add(t0, err)
		switch {
		case err != nil:
		case resp.Succeeded:
			mod = resp.Header.Revision
		case len(resp.Responses) == 1 && len(resp.Responses[0].GetResponseRange().Kvs) == 1:
			mod = resp.Responses[0].GetResponseRange().Kvs[0].ModRevision
		}
	})
	return nil
}

// apiStorm creates Events through kube-apiserver from o.stormWorkers
// goroutines at o.stormRate in all until ctx is done.
func (c *cluster) apiStorm(ctx context.Context, o shardOptions, rec *samples) error {
	client, err := c.ownConnection()
	if err != nil {
		return err
	}
	events := client.CoreV1().Events(shardStormNS)
	var wg sync.WaitGroup
	for w := 0; w < o.stormWorkers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			every(ctx, o.stormRate/float64(o.stormWorkers), func(n int) {
				seq := n*o.stormWorkers + w
				t0 := time.Now()
				_, err := events.Create(ctx, stormEvent(shardStormNS, fmt.Sprintf("storm-%d-%d", w, n), seq), metav1.CreateOptions{})
				if ctx.Err() == nil {
					rec.add(t0, err)
				}
			})
		}()
	}
	wg.Wait()
	return nil
}

// loadgenStorm runs loadgen's k8s workload with only its event creates at
// o.stormRate against url, for d.
func (c *cluster) loadgenStorm(o shardOptions, url string, d time.Duration) (*proc, error) {
	p := c.pki.path
	return startProc(c.opts.dir, "loadgen", o.loadgen,
		"--endpoints", url,
		"--cacert", p("ca.crt"), "--cert", p("apiserver-etcd-client.crt"), "--key", p("apiserver-etcd-client.key"),
		"--conns", "4", "--duration", fmt.Sprintf("%.0fs", d.Seconds()),
		"--key-space-size", "1", "--val-size", "600", "--json",
		"k8s", "--create-rate", "0", "--update-rate", "0", "--list-rate", "0", "--watchers", "0",
		"--event-rate", strconv.FormatFloat(o.stormRate, 'f', -1, 64),
		"--compact-interval", "1h")
}

// shardSnap is what a window's start and end read.
type shardSnap struct {
	at        time.Time
	pgetcd    histograms
	api       histograms
	cpu       map[string]float64 // CPU seconds by process group
	machine   float64            // busy CPU seconds of the machine
	load1     float64
	stormKeys int64
}

// The pgetcd series read, keyed by keyspace (and method).
var pgetcdHistogramKeys = map[string][]string{
	"grpc_server_handling_seconds":   {"keyspace", "grpc_method"},
	"pgetcd_commit_duration_seconds": {"keyspace"},
}

// The process groups whose CPU is reported.
var shardCPUGroups = []string{"pgetcd", "pg-main", "pg-events", "kube-apiserver", "other-control-plane", "harness", "loadgen", "rest-of-machine"}

func (c *cluster) snapshot(ctx context.Context, stormKeyspace, stormPrefix string, storm *proc) (shardSnap, error) {
	s := shardSnap{at: time.Now(), cpu: map[string]float64{}}
	text, err := httpGet(c.metricsURL)
	if err != nil {
		return s, err
	}
	s.pgetcd = parseHistograms(text, pgetcdHistogramKeys)
	if s.api, err = c.apiHistograms(); err != nil {
		return s, err
	}
	groups := map[string][]*proc{
		"pgetcd":              {c.storage},
		"pg-main":             {c.postgres},
		"pg-events":           {c.eventsPostgres},
		"kube-apiserver":      {c.apiserver},
		"other-control-plane": {c.controllers, c.scheduler, c.kwok},
		"loadgen":             {storm},
	}
	ours := 0.0
	for name, procs := range groups {
		var pids []int
		for _, p := range procs {
			pids = append(pids, p.pids()...)
		}
		s.cpu[name] = measure(pids).CPUSeconds
		ours += s.cpu[name]
	}
	s.cpu["harness"] = selfCPU()
	ours += s.cpu["harness"]
	s.machine = machineBusy()
	s.cpu["rest-of-machine"] = s.machine - ours
	if data, err := os.ReadFile("/proc/loadavg"); err == nil {
		s.load1, _ = strconv.ParseFloat(strings.Fields(string(data))[0], 64)
	}
	url := c.storageURL
	if stormKeyspace == shardEventsKeyspace {
		url = c.eventsURL
	}
	cli, err := c.etcdClientAt(url)
	if err != nil {
		return s, err
	}
	defer cli.Close()
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := cli.Get(cctx, stormPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return s, fmt.Errorf("counting the storm's keys: %w", err)
	}
	s.stormKeys = resp.Count
	return s, nil
}

// selfCPU is the harness's own CPU seconds (not its children's).
func selfCPU() float64 {
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0
	}
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	var ticks float64
	for _, k := range []int{11, 12} { // utime stime
		v, _ := strconv.ParseFloat(f[k], 64)
		ticks += v
	}
	return ticks / 100
}

// machineBusy is the CPU seconds all cores spent on anything but idle and
// I/O wait since boot.
func machineBusy() float64 {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	var busy float64
	for i, v := range f[1:] {
		if i == 3 || i == 4 || i >= 8 { // idle, iowait; guest time is in user already
			continue
		}
		x, _ := strconv.ParseFloat(v, 64)
		busy += x
	}
	return busy / 100
}

// httpGet fetches a plain-http URL (pgetcd's metrics listener).
func httpGet(url string) (string, error) {
	client := &http.Client{Timeout: 20 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(body), nil
}

// shardWindow is one measured window of one run.
type shardWindow struct {
	Run    int       `json:"run"`
	Layout string    `json:"layout"` // single or sharded
	Storm  string    `json:"storm"`  // none, apiserver or loadgen
	Start  time.Time `json:"start"`
	// Seconds of the window.
	Seconds float64 `json:"seconds"`
	// The 1-minute load average at the window's start and end.
	Load1Start float64 `json:"load1_start"`
	Load1End   float64 `json:"load1_end"`
	// Client side: ConfigMap updates through kube-apiserver, and the probe's
	// Txns straight to main.
	Writes         quantiles `json:"configmap_updates"`
	WriteErrors    int       `json:"configmap_update_errors"`
	WritesPerSec   float64   `json:"configmap_updates_per_second"`
	Probe          quantiles `json:"probe_txns"`
	ProbeErrors    int       `json:"probe_errors"`
	StormPerSec    float64   `json:"storm_events_per_second"` // new keys under the storm's prefix
	StormCreates   quantiles `json:"storm_creates,omitempty"` // the apiserver storm's own creates
	StormErrors    int       `json:"storm_errors"`
	StormKeyspace  string    `json:"storm_keyspace"`
	StormKeysTotal int64     `json:"storm_keys_at_end"`
	// kube-apiserver's histograms: the ConfigMap update request, and its
	// storage call for it.
	APIUpdate    histQuantiles      `json:"apiserver_update_configmaps"`
	APIStorage   histQuantiles      `json:"apiserver_etcd_update_configmaps"`
	MainTxn      histQuantiles      `json:"pgetcd_main_txn"`
	MainCommit   histQuantiles      `json:"pgetcd_main_commit"`
	EventsTxn    histQuantiles      `json:"pgetcd_events_txn"`
	EventsCommit histQuantiles      `json:"pgetcd_events_commit"`
	CPUCores     map[string]float64 `json:"cpu_cores"`
}

func (w *shardWindow) fill(from, to shardSnap, writes, probe, storm *samples) {
	w.Start, w.Seconds = from.at, to.at.Sub(from.at).Seconds()
	w.Load1Start, w.Load1End = from.load1, to.load1
	w.Writes, w.WriteErrors, w.WritesPerSec = writes.window(from.at, to.at)
	w.Probe, w.ProbeErrors, _ = probe.window(from.at, to.at)
	if storm != nil {
		w.StormCreates, w.StormErrors, _ = storm.window(from.at, to.at)
	}
	w.StormPerSec = float64(to.stormKeys-from.stormKeys) / w.Seconds
	w.StormKeysTotal = to.stormKeys
	w.APIUpdate = to.api.between(from.api, "apiserver_request_duration_seconds", "update configmaps")
	w.APIStorage = to.api.between(from.api, "etcd_request_duration_seconds", "update configmaps")
	w.MainTxn = to.pgetcd.between(from.pgetcd, "grpc_server_handling_seconds", shardMainKeyspace+" Txn")
	w.MainCommit = to.pgetcd.between(from.pgetcd, "pgetcd_commit_duration_seconds", shardMainKeyspace)
	w.EventsTxn = to.pgetcd.between(from.pgetcd, "grpc_server_handling_seconds", shardEventsKeyspace+" Txn")
	w.EventsCommit = to.pgetcd.between(from.pgetcd, "pgetcd_commit_duration_seconds", shardEventsKeyspace)
	w.CPUCores = map[string]float64{}
	for _, g := range shardCPUGroups {
		w.CPUCores[g] = (to.cpu[g] - from.cpu[g]) / w.Seconds
	}
}

// runShard runs one layout on c: the placement check, the writers, the
// quiet window, the storm and its window.
func (c *cluster) runShard(ctx context.Context, o shardOptions, run int, sharded bool) ([]shardWindow, []placement, error) {
	layout := "single"
	if sharded {
		layout = "sharded"
	}
	placed, err := c.checkPlacement(ctx, sharded)
	for _, p := range placed {
		logf("%s: in main %v, in events %v (want %s)", p.Key, p.Main, p.Events, p.Want)
	}
	if err != nil {
		return nil, placed, fmt.Errorf("placement: %w", err)
	}
	for _, ns := range []string{shardLoadNS, shardStormNS} {
		if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, placed, err
		}
	}
	stormKeyspace, stormPrefix := shardMainKeyspace, "/registry/events/"+shardStormNS+"/"
	if sharded {
		stormKeyspace = shardEventsKeyspace
	}
	if o.storm == "loadgen" {
		stormPrefix = loadgenPrefix
	}

	load, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	writes, probe := &samples{}, &samples{}
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	wg.Add(2)
	go func() { defer wg.Done(); errs <- c.writeConfigMaps(load, o, writes) }()
	go func() { defer wg.Done(); errs <- c.probe(load, o.probeRate, probe) }()
	logf("run %d %s: %d ConfigMap writers at %.0f updates/s in all, a probe at %.0f Txn/s on main; warm-up %s",
		run, layout, o.writers, o.writeRate, o.probeRate, o.warmup)
	wait := func(d time.Duration) error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
			return nil
		}
	}
	if err := wait(o.warmup); err != nil {
		return nil, placed, err
	}
	quietFrom, err := c.snapshot(ctx, stormKeyspace, stormPrefix, nil)
	if err != nil {
		return nil, placed, err
	}
	if err := wait(o.window); err != nil {
		return nil, placed, err
	}
	quietTo, err := c.snapshot(ctx, stormKeyspace, stormPrefix, nil)
	if err != nil {
		return nil, placed, err
	}
	quiet := shardWindow{Run: run, Layout: layout, Storm: "none", StormKeyspace: stormKeyspace}
	quiet.fill(quietFrom, quietTo, writes, probe, nil)

	var storm *samples
	var lg *proc
	stormCtx, stopStorm := context.WithCancel(load)
	defer stopStorm()
	switch o.storm {
	case "apiserver":
		storm = &samples{}
		wg.Add(1)
		go func() { defer wg.Done(); errs <- c.apiStorm(stormCtx, o, storm) }()
		logf("run %d %s: storm of %.0f Events/s from %d goroutines through kube-apiserver (to keyspace %s)",
			run, layout, o.stormRate, o.stormWorkers, stormKeyspace)
	case "loadgen":
		url := c.storageURL
		if sharded {
			url = c.eventsURL
		}
		if lg, err = c.loadgenStorm(o, url, o.ramp+o.window+5*time.Second); err != nil {
			return nil, placed, err
		}
		defer lg.stop()
		logf("run %d %s: storm of %.0f leased Txn creates/s from loadgen straight to keyspace %s (%s)",
			run, layout, o.stormRate, stormKeyspace, url)
	}
	if err := wait(o.ramp); err != nil {
		return nil, placed, err
	}
	stormFrom, err := c.snapshot(ctx, stormKeyspace, stormPrefix, lg)
	if err != nil {
		return nil, placed, err
	}
	if err := wait(o.window); err != nil {
		return nil, placed, err
	}
	stormTo, err := c.snapshot(ctx, stormKeyspace, stormPrefix, lg)
	if err != nil {
		return nil, placed, err
	}
	stopStorm()
	stormed := shardWindow{Run: run, Layout: layout, Storm: o.storm, StormKeyspace: stormKeyspace}
	stormed.fill(stormFrom, stormTo, writes, probe, storm)
	if lg != nil && !lg.running() {
		return nil, placed, fmt.Errorf("loadgen exited before the storm window ended:\n%s", lg.tail(20))
	}
	stopLoad()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return nil, placed, err
		}
	}
	return []shardWindow{quiet, stormed}, placed, nil
}

// shardReport is the JSON report.
type shardReport struct {
	Started   time.Time `json:"started"`
	Storm     string    `json:"storm"`
	StormRate float64   `json:"storm_rate_target"`
	WriteRate float64   `json:"configmap_update_rate_target"`
	ProbeRate float64   `json:"probe_rate_target"`
	Window    float64   `json:"window_seconds"`
	Pgetcd    string    `json:"pgetcd"`
	Overrides string    `json:"etcd_servers_overrides"`
	// The events keyspace's Postgres with fsync on (-shard-events-fsync).
	EventsFsync bool                   `json:"events_postgres_fsync"`
	Placement   map[string][]placement `json:"placement"`
	Windows     []shardWindow          `json:"windows"`
}

func runShards(ctx context.Context, base options, o shardOptions) bool {
	if o.runs < 1 || o.writers < 1 || o.writeRate <= 0 || o.probeRate <= 0 || o.stormRate <= 0 || o.stormWorkers < 1 {
		fmt.Println("-shard needs writers, a write rate, a probe rate, a storm rate and storm workers")
		return false
	}
	if o.storm != "apiserver" && o.storm != "loadgen" {
		fmt.Printf("-shard-storm %q: apiserver or loadgen\n", o.storm)
		return false
	}
	if o.storm == "loadgen" && o.loadgen == "" {
		fmt.Println("-shard-storm loadgen needs -loadgen")
		return false
	}
	if err := os.RemoveAll(base.dir); err != nil {
		fmt.Println(err)
		return false
	}
	base.backend = "pgetcd"
	base.eventsKeyspace = true
	base.eventsNoFsync = !o.eventsFsync
	// kube-apiserver's defaults: nothing expires or is compacted within a run
	// but what would in a real cluster.
	base.eventTTL = time.Hour
	base.compaction = 5 * time.Minute
	rep := shardReport{Started: time.Now(), Storm: o.storm, StormRate: o.stormRate, WriteRate: o.writeRate,
		ProbeRate: o.probeRate, Window: o.window.Seconds(), Pgetcd: base.pgetcd, EventsFsync: o.eventsFsync, Placement: map[string][]placement{}}
	ok := true
	for i := 1; i <= o.runs; i++ {
		// single, sharded, sharded, single, ...: drift hits both alike.
		order := []bool{false, true}
		if i%2 == 0 {
			order = []bool{true, false}
		}
		for _, sharded := range order {
			opts := base
			layout := "single"
			if sharded {
				layout = "sharded"
				opts.overrides = shardOverrides
			}
			opts.dir = filepath.Join(base.dir, fmt.Sprintf("r%d-%s", i, layout))
			logf("run %d of %d, %s: control plane in %s", i, o.runs, layout, opts.dir)
			c, err := startCluster(ctx, opts)
			if err != nil {
				fmt.Printf("run %d %s: the control plane did not start: %v\n", i, layout, err)
				return false
			}
			if sharded {
				rep.Overrides = c.serversOverrides()
				logf("kube-apiserver --etcd-servers=%s --etcd-servers-overrides=%s", c.storageURL, rep.Overrides)
			}
			windows, placed, err := c.runShard(ctx, o, i, sharded)
			c.stop()
			rep.Placement[fmt.Sprintf("r%d-%s", i, layout)] = placed
			if err != nil {
				fmt.Printf("run %d %s failed: %v\n", i, layout, err)
				ok = false
				if ctx.Err() != nil {
					return false
				}
				continue
			}
			for _, w := range windows {
				printShardWindow(w)
			}
			rep.Windows = append(rep.Windows, windows...)
		}
	}
	printShardTable(rep.Windows)
	if o.report != "" {
		data, err := json.MarshalIndent(rep, "", "  ")
		if err == nil {
			err = os.WriteFile(o.report, append(data, '\n'), 0o644)
		}
		if err != nil {
			fmt.Printf("writing the report: %v\n", err)
			return false
		}
		logf("report in %s", o.report)
	}
	return ok
}

func printShardWindow(w shardWindow) {
	logf("run %d %s storm=%s: %.1f s, load %.2f-%.2f; ConfigMap updates %.1f/s p50 %.1f p99 %.1f ms (%d errors); probe p50 %.1f p99 %.1f ms; storm %.0f/s to %s (%d errors); pgetcd main Txn p50 %.2f p99 %.2f ms, commit p50 %.2f p99 %.2f ms",
		w.Run, w.Layout, w.Storm, w.Seconds, w.Load1Start, w.Load1End, w.WritesPerSec, w.Writes.P50, w.Writes.P99, w.WriteErrors,
		w.Probe.P50, w.Probe.P99, w.StormPerSec, w.StormKeyspace, w.StormErrors, w.MainTxn.P50, w.MainTxn.P99, w.MainCommit.P50, w.MainCommit.P99)
}

// printShardTable prints one row per window and, per layout, each run's
// ratio of storm to quiet p99.
func printShardTable(ws []shardWindow) {
	fmt.Println("\nrun layout  storm      load  cm/s  cm p50/p99 ms    probe p50/p99 ms  apiserver-etcd p50/p99  main Txn p50/p99  main commit p50/p99  storm/s  CPU cores: pgetcd pg-main pg-events apiserver rest")
	for _, w := range ws {
		cpu := w.CPUCores
		fmt.Printf("%-3d %-7s %-9s %5.2f %5.1f %6.1f / %-7.1f %6.1f / %-7.1f %7.1f / %-7.1f   %6.2f / %-7.2f %6.2f / %-7.2f %8.0f  %.2f %.2f %.2f %.2f %.2f\n",
			w.Run, w.Layout, w.Storm, (w.Load1Start+w.Load1End)/2, w.WritesPerSec,
			w.Writes.P50, w.Writes.P99, w.Probe.P50, w.Probe.P99, w.APIStorage.P50, w.APIStorage.P99,
			w.MainTxn.P50, w.MainTxn.P99, w.MainCommit.P50, w.MainCommit.P99, w.StormPerSec,
			cpu["pgetcd"], cpu["pg-main"], cpu["pg-events"], cpu["kube-apiserver"], cpu["rest-of-machine"])
	}
	type key struct {
		run    int
		layout string
	}
	quiet := map[key]shardWindow{}
	for _, w := range ws {
		if w.Storm == "none" {
			quiet[key{w.Run, w.Layout}] = w
		}
	}
	var lines []string
	for _, w := range ws {
		q, found := quiet[key{w.Run, w.Layout}]
		if w.Storm == "none" || !found {
			continue
		}
		ratio := func(a, b float64) string {
			if b == 0 {
				return "-"
			}
			return fmt.Sprintf("%.2fx", a/b)
		}
		lines = append(lines, fmt.Sprintf("%-7s run %d: ConfigMap update p99 %s, probe p99 %s, apiserver-etcd p99 %s, main Txn p99 %s, main commit p99 %s",
			w.Layout, w.Run, ratio(w.Writes.P99, q.Writes.P99), ratio(w.Probe.P99, q.Probe.P99),
			ratio(w.APIStorage.P99, q.APIStorage.P99), ratio(w.MainTxn.P99, q.MainTxn.P99), ratio(w.MainCommit.P99, q.MainCommit.P99)))
	}
	sort.Strings(lines)
	fmt.Println("\nstorm / quiet, same run and layout:")
	for _, l := range lines {
		fmt.Println("  " + l)
	}
}
