package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
)

// benchOptions size the benchmark workload. It is our own driver, shaped
// after kube-burner's cluster-density, node-density and churn jobs (the Go
// module proxy here does not serve kube-burner), plus a LIST phase over one
// resource with many objects.
type benchOptions struct {
	enabled     bool
	namespaces  int
	podsPerNode int
	listObjects int
	listRounds  int
	report      string
}

// benchLabel marks every object the benchmark creates.
const benchLabel = "pgetcd-bench"

// jobResult is one phase's duration and what it created.
type jobResult struct {
	Name     string  `json:"name"`
	Seconds  float64 `json:"seconds"`
	Objects  int     `json:"objects"`
	PodCount int     `json:"pods,omitempty"`
}

// quantiles of a set of durations, in milliseconds.
type quantiles struct {
	Count int     `json:"count"`
	P50   float64 `json:"p50_ms"`
	P90   float64 `json:"p90_ms"`
	P99   float64 `json:"p99_ms"`
	Max   float64 `json:"max_ms"`
}

func quantilesOf(ds []time.Duration) quantiles {
	if len(ds) == 0 {
		return quantiles{}
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	at := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(ds)))) - 1
		if i < 0 {
			i = 0
		}
		return float64(ds[i].Microseconds()) / 1000
	}
	return quantiles{Count: len(ds), P50: at(0.5), P90: at(0.9), P99: at(0.99), Max: at(1)}
}

// benchReport is what one run writes: enough to compare backends.
type benchReport struct {
	Backend string      `json:"backend"`
	Started time.Time   `json:"started"`
	Nodes   int         `json:"nodes"`
	Jobs    []jobResult `json:"jobs"`
	// Pod latencies seen by a watch: creation to bound, creation to Running.
	PodScheduled quantiles `json:"pod_scheduled"`
	PodRunning   quantiles `json:"pod_running"`
	// The client's own latencies of LIST over listObjects objects straight from
	// storage (the resource's watch cache is off), full and in pages of 500.
	ListFull  quantiles `json:"list_full"`
	ListPaged quantiles `json:"list_paged"`
	// From kube-apiserver's /metrics, over the whole run: "VERB resource" and
	// "operation type".
	Requests map[string]histQuantiles `json:"apiserver_requests"`
	Storage  map[string]histQuantiles `json:"etcd_requests"`
	// The storage server (with its Postgres, for pgetcd and kine).
	StorageCPUSeconds float64 `json:"storage_cpu_seconds"`
	StoragePeakPSS    int64   `json:"storage_peak_pss_bytes"`
	StorageDiskBytes  int64   `json:"storage_disk_bytes"`
}

// podTimes records when a watch first saw each benchmark pod bound and Running.
type podTimes struct {
	mu                        sync.Mutex
	created, scheduled, ready map[string]time.Time
}

func (p *podTimes) observe(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Labels[benchLabel] == "" {
		return
	}
	now := time.Now()
	key := pod.Namespace + "/" + pod.Name
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, seen := p.created[key]; !seen {
		p.created[key] = now
	}
	if _, seen := p.scheduled[key]; !seen && pod.Spec.NodeName != "" {
		p.scheduled[key] = now
	}
	if _, seen := p.ready[key]; !seen && pod.Status.Phase == corev1.PodRunning {
		p.ready[key] = now
	}
}

func (p *podTimes) latencies() (scheduled, ready []time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, t0 := range p.created {
		if t, ok := p.scheduled[key]; ok {
			scheduled = append(scheduled, t.Sub(t0))
		}
		if t, ok := p.ready[key]; ok {
			ready = append(ready, t.Sub(t0))
		}
	}
	return scheduled, ready
}

// setCreated records the time just before the create was sent, which is
// earlier than any watch sees the pod.
func (p *podTimes) setCreated(key string, t time.Time) {
	p.mu.Lock()
	p.created[key] = t
	p.mu.Unlock()
}

func (c *cluster) runBench(ctx context.Context, nodes int, o benchOptions) error {
	rep := benchReport{Backend: c.opts.backend, Started: time.Now(), Nodes: nodes}
	if o.listRounds == 0 {
		o.listRounds = 30
	}
	before, err := c.apiHistograms()
	if err != nil {
		return err
	}
	cpu0 := measure(c.storagePIDs()).CPUSeconds
	stopSampling := c.samplePeakPSS(&rep.StoragePeakPSS)

	times := &podTimes{created: map[string]time.Time{}, scheduled: map[string]time.Time{}, ready: map[string]time.Time{}}
	factory := informers.NewSharedInformerFactoryWithOptions(c.client, 0,
		informers.WithTweakListOptions(func(lo *metav1.ListOptions) { lo.LabelSelector = benchLabel }))
	podInformer := factory.Core().V1().Pods().Informer()
	if _, err := podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    times.observe,
		UpdateFunc: func(_, obj any) { times.observe(obj) },
	}); err != nil {
		return err
	}
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())

	job := func(name string, f func() (objects, pods int, err error)) error {
		t0 := time.Now()
		objects, pods, err := f()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		r := jobResult{Name: name, Seconds: time.Since(t0).Seconds(), Objects: objects, PodCount: pods}
		logf("job %-16s %7.1f s  %6d objects  %6d pods", name, r.Seconds, objects, pods)
		rep.Jobs = append(rep.Jobs, r)
		return nil
	}
	if err := job("nodes", func() (int, int, error) {
		return nodes, 0, c.checkNodes(ctx, nodes)
	}); err != nil {
		return err
	}
	if err := job("cluster-density", func() (int, int, error) {
		return c.clusterDensity(ctx, times, 0, o.namespaces)
	}); err != nil {
		return err
	}
	if err := job("node-density", func() (int, int, error) {
		return c.nodeDensity(ctx, times, nodes*o.podsPerNode)
	}); err != nil {
		return err
	}
	for round := 1; round <= 2; round++ {
		if err := job(fmt.Sprintf("churn-%d", round), func() (int, int, error) {
			return c.churn(ctx, times, o.namespaces)
		}); err != nil {
			return err
		}
	}
	if err := job("list-objects", func() (int, int, error) {
		return o.listObjects, 0, c.createPodTemplates(ctx, o.listObjects)
	}); err != nil {
		return err
	}
	full, paged, err := c.timeLists(ctx, o.listObjects, o.listRounds)
	if err != nil {
		return err
	}
	rep.ListFull, rep.ListPaged = quantilesOf(full), quantilesOf(paged)
	logf("LIST %d podtemplates from storage: full p50 %.1f p99 %.1f ms; paged p50 %.1f p99 %.1f ms",
		o.listObjects, rep.ListFull.P50, rep.ListFull.P99, rep.ListPaged.P50, rep.ListPaged.P99)

	scheduled, ready := times.latencies()
	rep.PodScheduled, rep.PodRunning = quantilesOf(scheduled), quantilesOf(ready)
	stopSampling()
	rep.StorageCPUSeconds = measure(c.storagePIDs()).CPUSeconds - cpu0
	rep.StorageDiskBytes = dirSize(c.dataDir)
	after, err := c.apiHistograms()
	if err != nil {
		return err
	}
	rep.Requests, rep.Storage = after.since(before)
	logf("pods: scheduled p50 %.0f p99 %.0f ms, running p50 %.0f p99 %.0f ms; storage CPU %.1f s, peak PSS %d MiB, disk %d MiB",
		rep.PodScheduled.P50, rep.PodScheduled.P99, rep.PodRunning.P50, rep.PodRunning.P99,
		rep.StorageCPUSeconds, rep.StoragePeakPSS>>20, rep.StorageDiskBytes>>20)
	if o.report == "" {
		return nil
	}
	data, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(o.report, data, 0o644)
}

// storagePIDs is the storage server with its children (pgetcd's managed
// Postgres) and, for kine, its Postgres.
func (c *cluster) storagePIDs() []int {
	return append(c.storage.pids(), c.postgres.pids()...)
}

// samplePeakPSS samples the storage server's memory every second until the
// returned function is called.
func (c *cluster) samplePeakPSS(peak *int64) func() {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			if pss := measure(c.storagePIDs()).PSSBytes; pss > *peak {
				*peak = pss
			}
			select {
			case <-done:
				return
			case <-time.After(time.Second):
			}
		}
	}()
	return func() { close(done); <-finished }
}

// parallel runs f(i) for i in [0, n), `workers` at a time, and returns the
// first error.
func parallel(n, workers int, f func(i int) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	next := make(chan int)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := f(i); err != nil {
					errs <- err
					for range next {
					}
					return
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	return <-errs
}

func benchMeta(name string) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: name, Labels: map[string]string{benchLabel: "1"}}
}

// clusterDensity creates namespaces [from, to) of cluster-density: each with
// two Deployments of two pods, two Services, four ConfigMaps and four Secrets,
// and waits until every pod runs.
func (c *cluster) clusterDensity(ctx context.Context, times *podTimes, from, to int) (int, int, error) {
	objects := 0
	var mu sync.Mutex
	err := parallel(to-from, 5, func(i int) error {
		ns := fmt.Sprintf("density-%03d", from+i)
		n := 0
		if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: benchMeta(ns)}, metav1.CreateOptions{}); err != nil {
			return err
		}
		n++
		if err := waitFor(ctx, "default service account in "+ns, time.Minute, func() error {
			_, err := c.client.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
			return err
		}); err != nil {
			return err
		}
		for j := 0; j < 4; j++ {
			cm := &corev1.ConfigMap{ObjectMeta: benchMeta(fmt.Sprintf("cm-%d", j)), Data: map[string]string{"data": strings.Repeat("x", 1024)}}
			if _, err := c.client.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
				return err
			}
			secret := &corev1.Secret{ObjectMeta: benchMeta(fmt.Sprintf("secret-%d", j)), Data: map[string][]byte{"key": []byte(strings.Repeat("s", 1024))}}
			if _, err := c.client.CoreV1().Secrets(ns).Create(ctx, secret, metav1.CreateOptions{}); err != nil {
				return err
			}
			n += 2
		}
		for j := 0; j < 2; j++ {
			name := fmt.Sprintf("app-%d", j)
			d := deployment(name, 2)
			d.Labels = map[string]string{benchLabel: "1"}
			d.Spec.Template.Labels[benchLabel] = "1"
			if _, err := c.client.AppsV1().Deployments(ns).Create(ctx, d, metav1.CreateOptions{}); err != nil {
				return err
			}
			svc := &corev1.Service{ObjectMeta: benchMeta(name), Spec: corev1.ServiceSpec{
				Selector: map[string]string{"app": name},
				Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}},
			}}
			if _, err := c.client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
				return err
			}
			n += 2
		}
		mu.Lock()
		objects += n
		mu.Unlock()
		return nil
	})
	if err != nil {
		return objects, 0, err
	}
	pods := (to - from) * 4
	return objects, pods, c.waitBenchPods(ctx, "density-", pods)
}

// waitBenchPods waits until `want` benchmark pods in namespaces starting with
// prefix run.
func (c *cluster) waitBenchPods(ctx context.Context, prefix string, want int) error {
	return waitFor(ctx, fmt.Sprintf("%d pods Running", want), 20*time.Minute, func() error {
		pods, err := c.client.CoreV1().Pods("").List(ctx, metav1.ListOptions{LabelSelector: benchLabel, ResourceVersion: "0"})
		if err != nil {
			return err
		}
		running := 0
		for _, p := range pods.Items {
			if strings.HasPrefix(p.Namespace, prefix) && p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil {
				running++
			}
		}
		if running < want {
			return fmt.Errorf("%d of %d Running", running, want)
		}
		return nil
	})
}

// nodeDensity creates `pods` bare pods in one namespace, 20 at a time, and
// waits until they run.
func (c *cluster) nodeDensity(ctx context.Context, times *podTimes, pods int) (int, int, error) {
	const ns = "node-density"
	if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: benchMeta(ns)}, metav1.CreateOptions{}); err != nil {
		return 0, 0, err
	}
	if err := waitFor(ctx, "default service account", time.Minute, func() error {
		_, err := c.client.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return 0, 0, err
	}
	err := parallel(pods, 20, func(i int) error {
		name := fmt.Sprintf("pod-%05d", i)
		pod := &corev1.Pod{ObjectMeta: benchMeta(name), Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}},
		}}
		pod.Labels["app"] = "node-density"
		onKwok(&pod.Spec)
		times.setCreated(ns+"/"+name, time.Now())
		_, err := c.client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
		return err
	})
	if err != nil {
		return 0, 0, err
	}
	return pods + 1, pods, c.waitBenchPods(ctx, ns, pods)
}

// churn deletes half of the cluster-density namespaces, waits until they are
// gone, and creates them again.
func (c *cluster) churn(ctx context.Context, times *podTimes, namespaces int) (int, int, error) {
	half := namespaces / 2
	if err := parallel(half, 5, func(i int) error {
		return c.client.CoreV1().Namespaces().Delete(ctx, fmt.Sprintf("density-%03d", i), metav1.DeleteOptions{})
	}); err != nil {
		return 0, 0, err
	}
	if err := waitFor(ctx, "churned namespaces gone", 10*time.Minute, func() error {
		for i := 0; i < half; i++ {
			if _, err := c.client.CoreV1().Namespaces().Get(ctx, fmt.Sprintf("density-%03d", i), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return fmt.Errorf("density-%03d still there (%v)", i, err)
			}
		}
		return nil
	}); err != nil {
		return 0, 0, err
	}
	objects, pods, err := c.clusterDensity(ctx, times, 0, half)
	if err != nil {
		return 0, 0, err
	}
	return objects, pods, c.waitBenchPods(ctx, "density-", namespaces*4)
}

// createPodTemplates creates n PodTemplates of about 1 KiB: the resource whose
// watch cache the benchmark's apiserver turns off, so its LISTs go to storage.
func (c *cluster) createPodTemplates(ctx context.Context, n int) error {
	const ns = "list"
	if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: benchMeta(ns)}, metav1.CreateOptions{}); err != nil {
		return err
	}
	return parallel(n, 20, func(i int) error {
		pt := &corev1.PodTemplate{ObjectMeta: benchMeta(fmt.Sprintf("pt-%05d", i)), Template: corev1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "list", "index": strconv.Itoa(i)}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{
				Name: "app", Image: "registry.k8s.io/pause:3.10",
				Env: []corev1.EnvVar{{Name: "PADDING", Value: strings.Repeat("p", 768)}},
			}}},
		}}
		_, err := c.client.CoreV1().PodTemplates(ns).Create(ctx, pt, metav1.CreateOptions{})
		return err
	})
}

// timeLists times `rounds` full LISTs of the PodTemplates and as many LISTs in
// pages of 500, one at a time.
func (c *cluster) timeLists(ctx context.Context, n, rounds int) (full, paged []time.Duration, err error) {
	pts := c.client.CoreV1().PodTemplates("list")
	for r := 0; r < rounds; r++ {
		t0 := time.Now()
		list, err := pts.List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, nil, err
		}
		full = append(full, time.Since(t0))
		if len(list.Items) != n {
			return nil, nil, fmt.Errorf("full list: %d items, want %d", len(list.Items), n)
		}
		t0 = time.Now()
		seen, cont := 0, ""
		for {
			page, err := pts.List(ctx, metav1.ListOptions{Limit: 500, Continue: cont})
			if err != nil {
				return nil, nil, err
			}
			seen += len(page.Items)
			if cont = page.Continue; cont == "" {
				break
			}
		}
		paged = append(paged, time.Since(t0))
		if seen != n {
			return nil, nil, fmt.Errorf("paged list: %d items, want %d", seen, n)
		}
	}
	return full, paged, nil
}
