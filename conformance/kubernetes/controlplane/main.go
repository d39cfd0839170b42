// Command controlplane runs a real Kubernetes control plane on a storage
// server and checks that it works: kube-apiserver (mutual TLS to the storage
// server), kube-controller-manager, kube-scheduler and kwok simulating nodes.
// The storage server is pgetcd, real etcd or kine (-backend).
//
// It creates the nodes, then checks namespaces, Deployments down to Running
// pods, Services and EndpointSlices, ConfigMaps and Secrets, a CRD with custom
// objects, watches (client-go and `kubectl get -w`), consistent lists served
// from the watch cache, events that expire with their lease, cascading
// deletion, compaction driven by kube-apiserver, and a restart of the storage
// server under the running apiserver. It prints one line per check and a
// closing "N passed, N failed" line, and exits 1 when a check failed.
//
// With -bench it runs the benchmark workload of bench.go instead; with -ha N,
// the high-availability scenario of haload.go on N pgetcd instances; with
// -migrate N, the migration from etcd to pgetcd of migrate.go, N times; with
// -shard N, the keyspace isolation scenario of shard.go (an event storm with
// events in the main keyspace, then in a keyspace of their own), N runs each.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

func logf(format string, args ...any) {
	fmt.Printf("%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

func main() {
	var o options
	var nodes int
	var bench benchOptions
	var ha haOptions
	flag.StringVar(&o.backend, "backend", "pgetcd", "storage server: pgetcd, etcd or kine")
	flag.StringVar(&o.dir, "dir", "", "working directory of the run (wiped first)")
	flag.StringVar(&o.bin, "bin", "", "directory of kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and kine")
	flag.StringVar(&o.pgetcd, "pgetcd", "", "the pgetcd binary")
	flag.StringVar(&o.etcd, "etcd", "", "the etcd binary")
	flag.StringVar(&o.testPG, "test-postgres", "", "the pgetcd-test-postgres binary (kine's Postgres)")
	flag.DurationVar(&o.compaction, "compaction-interval", 15*time.Second, "kube-apiserver --etcd-compaction-interval")
	flag.DurationVar(&o.eventTTL, "event-ttl", 15*time.Second, "kube-apiserver --event-ttl")
	flag.IntVar(&nodes, "nodes", 1000, "kwok nodes to create")
	flag.BoolVar(&bench.enabled, "bench", false, "run the benchmark workload instead of the checks")
	flag.IntVar(&bench.namespaces, "bench-namespaces", 20, "cluster-density namespaces")
	flag.IntVar(&bench.podsPerNode, "bench-pods-per-node", 10, "node-density pods per kwok node")
	flag.IntVar(&bench.listObjects, "bench-list-objects", 10000, "objects of one resource for the LIST latency phase")
	flag.StringVar(&bench.report, "bench-report", "", "where the benchmark writes its JSON report")
	flag.IntVar(&bench.listRounds, "bench-list-rounds", 30, "LISTs timed in the LIST phase, full and paged each")
	flag.IntVar(&o.instances, "ha", 0, "run the high-availability scenario on this many pgetcd instances of one keyspace instead of the checks")
	flag.DurationVar(&ha.duration, "ha-duration", 80*time.Second, "how long the high-availability load runs")
	flag.IntVar(&ha.workers, "ha-workers", 4, "load workers, each creating and updating ConfigMaps of its own")
	flag.Float64Var(&ha.rate, "ha-rate", 10, "requests per second of each load worker")
	flag.IntVar(&ha.kills, "ha-kills", 3, "how often the writer is killed (SIGKILL) during the load")
	flag.DurationVar(&ha.warmup, "ha-warmup", 10*time.Second, "load before the first kill")
	flag.DurationVar(&ha.killEvery, "ha-kill-every", 20*time.Second, "time from one kill to the next")
	flag.DurationVar(&ha.down, "ha-down", 5*time.Second, "how long a killed writer stays down before its restart")
	flag.DurationVar(&o.progressNotify, "ha-progress-notify", 5*time.Second,
		"the instances' --watch-progress-notify-interval (kubeadm writes 5s for etcd); 0: pgetcd's default, 10m")
	flag.BoolVar(&o.routeEvents, "route-events", false,
		"pgetcd only: serve a second keyspace, events, and route /registry/events/ to it on the one endpoint kube-apiserver uses (--route-prefix); adds a check that the events are there")
	var mig migrateOptions
	flag.IntVar(&mig.runs, "migrate", 0, "run the migration scenario of migrate.go this many times (each on a fresh cluster) instead of the checks")
	flag.BoolVar(&mig.baseline, "migrate-baseline", false, "in the migration scenario, restart kube-apiserver on etcd instead of migrating (the control)")
	flag.IntVar(&mig.namespaces, "migrate-namespaces", 5, "namespaces of the migration scenario's workload")
	flag.IntVar(&mig.configMaps, "migrate-configmaps", 300, "ConfigMaps of the migration scenario's workload")
	flag.IntVar(&mig.leases, "migrate-leases", 20, "coordination Leases of the migration scenario's workload")
	flag.IntVar(&mig.events, "migrate-events", 100, "Events of the migration scenario's workload, before the load")
	flag.Float64Var(&mig.rate, "migrate-rate", 20, "writes per second of the migration scenario's load")
	flag.DurationVar(&mig.follow, "migrate-follow", 10*time.Second, "how long pgetcd migrate follows under the load before the cutover")
	flag.DurationVar(&mig.after, "migrate-after", 10*time.Second, "load after the first write after the cutover")
	flag.BoolVar(&mig.retryAfter, "migrate-retry-after", true,
		"in the migration scenario, kube-apiserver --shutdown-send-retry-after (false: its default shutdown, which waits up to 60 s for open watches; the harness kills it after 30 s)")
	var shard shardOptions
	flag.IntVar(&shard.runs, "shard", 0, "run the keyspace isolation scenario of shard.go this many times per layout (single keyspace, events sharded), alternating, instead of the checks")
	flag.StringVar(&shard.storm, "shard-storm", "apiserver", "where the event storm comes from: apiserver (client-go creates through kube-apiserver) or loadgen (leased Txn creates straight to the keyspace Events go to)")
	flag.Float64Var(&shard.stormRate, "shard-storm-rate", 1000, "Events per second the storm aims at")
	flag.IntVar(&shard.stormWorkers, "shard-storm-workers", 64, "goroutines of the storm through kube-apiserver")
	flag.Float64Var(&shard.writeRate, "shard-rate", 20, "ConfigMap updates per second through kube-apiserver, over all writers")
	flag.IntVar(&shard.writers, "shard-writers", 4, "ConfigMap writers, each updating its own ConfigMap")
	flag.Float64Var(&shard.probeRate, "shard-probe-rate", 20, "Txns per second of the probe writing one key of main straight to pgetcd")
	flag.DurationVar(&shard.warmup, "shard-warmup", 10*time.Second, "writes before the quiet window")
	flag.DurationVar(&shard.window, "shard-window", 30*time.Second, "length of each measured window (quiet, storm)")
	flag.DurationVar(&shard.ramp, "shard-ramp", 5*time.Second, "from the storm's start to its window")
	flag.StringVar(&shard.loadgen, "loadgen", "", "the loadgen binary (-shard-storm loadgen)")
	flag.BoolVar(&shard.eventsFsync, "shard-events-fsync", true, "the events keyspace's Postgres with fsync and synchronous commit on (false: off, to see what the shared disk costs main)")
	flag.StringVar(&shard.report, "shard-report", "", "where the keyspace isolation scenario writes its JSON report")
	flag.Parse()
	if bench.enabled {
		// LISTs of the benchmark's PodTemplates go to storage, not the watch cache.
		o.apiArgs = append(o.apiArgs, "--watch-cache-sizes=podtemplates#0")
	}
	for name, v := range map[string]string{"-dir": o.dir, "-bin": o.bin} {
		if v == "" {
			fmt.Fprintf(os.Stderr, "%s is required\n", name)
			os.Exit(2)
		}
	}
	var err error
	if o.dir, err = filepath.Abs(o.dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if shard.runs > 0 {
		if !runShards(ctx, o, shard) {
			cancel()
			os.Exit(1)
		}
		return
	}
	if mig.runs > 0 {
		if !runMigrations(ctx, o, mig) {
			cancel()
			os.Exit(1)
		}
		return
	}

	logf("starting the control plane on %s in %s", o.backend, o.dir)
	c, err := startCluster(ctx, o)
	if err != nil {
		fmt.Printf("control plane did not start: %v\n0 passed, 1 failed\n", err)
		os.Exit(1)
	}
	defer c.stop()
	logf("kube-apiserver at %s on %s at %s", c.apiURL, o.backend, c.storageURL)

	if o.instances > 0 {
		passed, err := c.runHA(ctx, ha)
		if err != nil {
			fmt.Printf("high-availability scenario failed: %v\n", err)
		}
		if err != nil || !passed {
			c.stop()
			os.Exit(1)
		}
		return
	}
	if bench.enabled {
		if err := c.runBench(ctx, nodes, bench); err != nil {
			fmt.Printf("benchmark failed: %v\n", err)
			c.stop()
			os.Exit(1)
		}
		return
	}
	if !runChecks(ctx, c, nodes) {
		c.stop()
		os.Exit(1)
	}
}

// runChecks runs every check in order and reports whether all passed. A
// failed check does not stop the ones after it unless they depend on it.
func runChecks(ctx context.Context, c *cluster, nodes int) bool {
	passed, failed := 0, 0
	run := func(name string, f func() error) bool {
		t0 := time.Now()
		err := f()
		if err != nil {
			failed++
			logf("FAIL %-28s %s: %v", name, time.Since(t0).Round(time.Millisecond), err)
			return false
		}
		passed++
		logf("ok   %-28s %s", name, time.Since(t0).Round(time.Millisecond))
		return true
	}
	skip := func(name, why string) {
		failed++
		logf("FAIL %-28s skipped: %s", name, why)
	}
	run(fmt.Sprintf("%d kwok nodes Ready", nodes), func() error { return c.checkNodes(ctx, nodes) })
	if run("namespace", func() error { return c.checkNamespace(ctx) }) {
		deployed := run("deployment to running pods", func() error { return c.checkDeployment(ctx) })
		if deployed {
			run("service and endpointslice", func() error { return c.checkService(ctx) })
		} else {
			skip("service and endpointslice", "no running pods")
		}
		run("configmaps and secrets", func() error { return c.checkConfigMapsAndSecrets(ctx) })
		run("crd and custom objects", func() error { return c.checkCRD(ctx) })
		kw, err := c.startKubectlWatch(ctx)
		if err != nil {
			skip("watches", err.Error())
		} else {
			defer func() { _ = kw.cmd.Process.Kill() }()
			run("watches", func() error { return c.checkWatch(ctx, kw) })
		}
		run("consistent list from cache", func() error { return c.checkConsistentListFromCache(ctx) })
		run("events expire with leases", func() error { return c.checkEventTTL(ctx) })
		if deployed {
			run("cascading deletion", func() error { return c.checkGarbageCollection(ctx) })
		} else {
			skip("cascading deletion", "no deployment")
		}
		run("compaction by kube-apiserver", func() error { return c.checkCompaction(ctx) })
		if c.opts.routeEvents {
			run("events routed to their keyspace", func() error { return c.checkRoutedEvents(ctx) })
		}
		if kw != nil {
			run("storage restart", func() error { return c.checkStorageRestart(ctx, kw) })
		} else {
			skip("storage restart", "no kubectl watch")
		}
		run("watch cache consistent", func() error { return c.checkCacheConsistency(ctx) })
	}
	logf("controlplane on %s", c.opts.backend)
	fmt.Printf("controlplane: %d passed, %d failed\n", passed, failed)
	return failed == 0
}
