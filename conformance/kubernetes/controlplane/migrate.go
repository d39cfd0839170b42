package main

// The migration scenario (-migrate N): a control plane on real etcd, moved to
// pgetcd while it runs, N times, each on a fresh cluster.
//
//  1. etcd 3.5 (mutual TLS), kube-apiserver on it, the rest of the control
//     plane, and a throwaway Postgres for pgetcd.
//  2. A workload through client-go: namespaces, ConfigMaps, coordination
//     Leases and Events (whose keys carry etcd leases). Then, for the whole
//     run, a writer at a steady rate (ConfigMap patches, a Lease renewal and an
//     Event create in every 20 writes) and a ConfigMap informer (a
//     SharedInformerFactory) whose requests are recorded: which were lists
//     (a plain LIST or a watch with sendInitialEvents) and which were watches
//     resumed from a resourceVersion, and their HTTP status.
//  3. `pgetcd migrate --from <etcd> --freeze-source` copies etcd's snapshot
//     and follows it. After -migrate-follow under the load, the cutover, timed
//     step by step: kube-apiserver stopped (SIGTERM), SIGTERM to the migrate
//     process and its exit 0 ("cut over at revision N"), pgetcd started on the
//     keyspace and serving, kube-apiserver started with --etcd-servers at
//     pgetcd (every other flag the same) until the writer's first success.
//  4. Checks: every object of the workload's namespaces listed through the
//     apiserver after the cutover is what a list before it plus the writes
//     acknowledged since say (its whole content and resourceVersion); etcd's
//     keys at revision N and pgetcd's are the same (value, create and mod
//     revision, version, lease), and so are their watch histories from
//     revision 1 to N; the leases of those keys have the same granted TTL; the
//     keyspace is at revision N when pgetcd starts and the first write after
//     it gets a later one; the informer's store ends equal to a list, having
//     seen every acknowledged write; how often it listed, and why.
//
// With -migrate-baseline the same run restarts kube-apiserver on the same etcd
// instead (no migration): the control for the window and the relists.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// migrateOptions shape the workload and the runs.
type migrateOptions struct {
	runs       int
	baseline   bool // restart kube-apiserver on etcd instead of migrating
	namespaces int
	configMaps int // in all, spread over the namespaces
	leases     int
	events     int
	rate       float64       // writes per second during the whole run
	follow     time.Duration // pgetcd migrate following under the load before the cutover
	after      time.Duration // load after the first write after the cutover
	// kube-apiserver --shutdown-send-retry-after: at SIGTERM it answers 429
	// until its requests drained, then gives open watches 2 s. Without it, it
	// stops listening at once but waits for open watches up to its request
	// timeout (60 s).
	retryAfter bool
}

// migKeyspace is the keyspace pgetcd migrates into and serves.
const migKeyspace = "kubernetes"

// migWrite is one write of the writer.
type migWrite struct {
	key        string // resource/namespace/name
	start, end time.Time
	obj        object // the answer; zero on error
	err        error
}

// object is one API object: its resourceVersion and its JSON without
// apiVersion and kind (lists leave those out of their items).
type object struct {
	rv   int64
	json string
}

func toObject(v any) (object, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return object{}, err
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		return object{}, err
	}
	delete(m, "apiVersion")
	delete(m, "kind")
	rv := int64(0)
	if md, ok := m["metadata"].(map[string]any); ok {
		s, _ := md["resourceVersion"].(string)
		rv, _ = strconv.ParseInt(s, 10, 64)
	}
	data, err = json.Marshal(m) // map keys sorted
	return object{rv: rv, json: string(data)}, err
}

// migWorkload is what the run created, by key.
type migWorkload struct {
	namespaces []string
	configMaps []string // namespace/name
	leases     []string
	eventNS    string
}

func (c *cluster) createWorkload(ctx context.Context, o migrateOptions) (*migWorkload, error) {
	w := &migWorkload{}
	for i := 1; i <= o.namespaces; i++ {
		ns := fmt.Sprintf("migrate-%d", i)
		if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
		w.namespaces = append(w.namespaces, ns)
	}
	w.eventNS = w.namespaces[0]
	var jobs []func() error
	for i := 0; i < o.configMaps; i++ {
		ns := w.namespaces[i%len(w.namespaces)]
		name := fmt.Sprintf("cm-%04d", i)
		w.configMaps = append(w.configMaps, ns+"/"+name)
		jobs = append(jobs, func() error {
			_, err := c.client.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "migrate"}},
				Data:       map[string]string{"seq": "0", "payload": strings.Repeat("x", 512)},
			}, metav1.CreateOptions{})
			return err
		})
	}
	for i := 0; i < o.leases; i++ {
		ns := w.namespaces[i%len(w.namespaces)]
		name := fmt.Sprintf("lease-%03d", i)
		w.leases = append(w.leases, ns+"/"+name)
		jobs = append(jobs, func() error {
			now := metav1.NowMicro()
			_, err := c.client.CoordinationV1().Leases(ns).Create(ctx, &coordinationv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec: coordinationv1.LeaseSpec{
					HolderIdentity: ptrTo("controlplane"), LeaseDurationSeconds: ptrTo(int32(15)),
					AcquireTime: &now, RenewTime: &now,
				},
			}, metav1.CreateOptions{})
			return err
		})
	}
	for i := 0; i < o.events; i++ {
		jobs = append(jobs, func() error {
			_, err := c.client.CoreV1().Events(w.eventNS).Create(ctx, migEvent(w, fmt.Sprintf("ev-init-%04d", i)), metav1.CreateOptions{})
			return err
		})
	}
	if err := runParallel(jobs, 8); err != nil {
		return nil, err
	}
	// The root CA ConfigMap of each namespace is the controller manager's:
	// wait for it, so that nothing but the writer changes the namespaces later.
	err := waitFor(ctx, "kube-root-ca.crt in every namespace", 60*time.Second, func() error {
		for _, ns := range w.namespaces {
			if _, err := c.client.CoreV1().ConfigMaps(ns).Get(ctx, "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
				return err
			}
		}
		return nil
	})
	return w, err
}

func ptrTo[T any](v T) *T { return &v }

func migEvent(w *migWorkload, name string) *corev1.Event {
	now := metav1.Now()
	involved := strings.SplitN(w.configMaps[0], "/", 2)
	return &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: name, Namespace: w.eventNS},
		InvolvedObject: corev1.ObjectReference{Kind: "ConfigMap", APIVersion: "v1", Namespace: involved[0], Name: involved[1]},
		Reason:         "Migrate", Message: "written by the migration scenario's load", Type: corev1.EventTypeNormal,
		Source:         corev1.EventSource{Component: "controlplane"},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
	}
}

// runParallel runs the jobs on n goroutines and returns the first error.
func runParallel(jobs []func() error, n int) error {
	ch := make(chan func() error)
	errs := make(chan error, len(jobs))
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range ch {
				errs <- j()
			}
		}()
	}
	for _, j := range jobs {
		ch <- j
	}
	close(ch)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// listWorkload lists, through the apiserver, the workload's namespaces and
// every ConfigMap, Lease and Event in them, by key.
func (c *cluster) listWorkload(ctx context.Context, w *migWorkload) (map[string]object, error) {
	out := map[string]object{}
	add := func(key string, v any) error {
		obj, err := toObject(v)
		out[key] = obj
		return err
	}
	for _, ns := range w.namespaces {
		n, err := c.client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		if err := add("namespaces//"+ns, n); err != nil {
			return nil, err
		}
		cms, err := c.client.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err
		}
		for i := range cms.Items {
			if err := add("configmaps/"+ns+"/"+cms.Items[i].Name, &cms.Items[i]); err != nil {
				return nil, err
			}
		}
		leases, err := c.client.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err
		}
		for i := range leases.Items {
			if err := add("leases/"+ns+"/"+leases.Items[i].Name, &leases.Items[i]); err != nil {
				return nil, err
			}
		}
		events, err := c.client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err
		}
		for i := range events.Items {
			if err := add("events/"+ns+"/"+events.Items[i].Name, &events.Items[i]); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// migWriter writes at a steady rate, each write on its own goroutine (at most
// 16 in flight; a tick finding 16 in flight is skipped), and records them.
type migWriter struct {
	c      *cluster
	w      *migWorkload
	mu     sync.Mutex
	writes []migWrite
	events int
}

func (mw *migWriter) run(ctx context.Context, rate float64) {
	tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer tick.Stop()
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	defer wg.Wait()
	cm, lease := 0, 0
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		select {
		case sem <- struct{}{}:
		default:
			continue
		}
		var f func() migWrite
		switch i % 20 {
		case 0:
			mw.events++
			f = mw.createEvent(fmt.Sprintf("ev-%06d", mw.events))
		case 10:
			f = mw.renewLease(mw.w.leases[lease%len(mw.w.leases)])
			lease++
		default:
			f = mw.patchConfigMap(mw.w.configMaps[cm%len(mw.w.configMaps)], i)
			cm++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			q := f()
			mw.mu.Lock()
			mw.writes = append(mw.writes, q)
			mw.mu.Unlock()
		}()
	}
}

// write runs one request with a 5 s deadline.
func write(key string, f func(context.Context) (any, error)) migWrite {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q := migWrite{key: key, start: time.Now()}
	v, err := f(ctx)
	q.end = time.Now()
	if err == nil {
		q.obj, err = toObject(v)
	}
	q.err = err
	return q
}

func (mw *migWriter) patchConfigMap(nsName string, seq int) func() migWrite {
	ns, name, _ := strings.Cut(nsName, "/")
	return func() migWrite {
		return write("configmaps/"+nsName, func(ctx context.Context) (any, error) {
			patch := fmt.Sprintf(`{"data":{"seq":%q}}`, strconv.Itoa(seq))
			return mw.c.client.CoreV1().ConfigMaps(ns).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		})
	}
}

func (mw *migWriter) renewLease(nsName string) func() migWrite {
	ns, name, _ := strings.Cut(nsName, "/")
	return func() migWrite {
		return write("leases/"+nsName, func(ctx context.Context) (any, error) {
			now, err := json.Marshal(metav1.NowMicro())
			if err != nil {
				return nil, err
			}
			patch := fmt.Sprintf(`{"spec":{"renewTime":%s}}`, now)
			return mw.c.client.CoordinationV1().Leases(ns).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		})
	}
}

func (mw *migWriter) createEvent(name string) func() migWrite {
	return func() migWrite {
		return write("events/"+mw.w.eventNS+"/"+name, func(ctx context.Context) (any, error) {
			return mw.c.client.CoreV1().Events(mw.w.eventNS).Create(ctx, migEvent(mw.w, name), metav1.CreateOptions{})
		})
	}
}

func (mw *migWriter) snapshot() []migWrite {
	mw.mu.Lock()
	defer mw.mu.Unlock()
	return slices.Clone(mw.writes)
}

// firstSuccessAfter is the end of the first successful write that ended after
// t (zero when none did).
func firstSuccessAfter(writes []migWrite, t time.Time) time.Time {
	var first time.Time
	for _, q := range writes {
		if q.err == nil && q.end.After(t) && (first.IsZero() || q.end.Before(first)) {
			first = q.end
		}
	}
	return first
}

// lastSuccessBefore is the end of the last successful write that ended
// before t.
func lastSuccessBefore(writes []migWrite, t time.Time) time.Time {
	var last time.Time
	for _, q := range writes {
		if q.err == nil && q.end.Before(t) && q.end.After(last) {
			last = q.end
		}
	}
	return last
}

// apiRequest is one request of the informer to kube-apiserver.
type apiRequest struct {
	at     time.Time
	list   bool // a LIST, or a watch with sendInitialEvents (client-go's watch-list)
	rv     string
	status int // 0: no answer
	err    error
	// The message of an ERROR event in a watch's stream (a 410 Gone comes so
	// when the watch had been accepted), as far as the informer read.
	watchErr string
}

// migInformer is a ConfigMap informer of a SharedInformerFactory, its
// requests to kube-apiserver recorded by a wrapped transport.
type migInformer struct {
	mu       sync.Mutex
	requests []apiRequest
	handled  int // add, update and delete notifications
	informer cache.SharedIndexInformer
	stop     chan struct{}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

// errorScanner passes a watch's stream through and keeps the message of its
// first ERROR event. The informer's client speaks protobuf: an ERROR event's
// object is a Status, "Failure" (field 2) then its message (field 3).
type errorScanner struct {
	body io.ReadCloser
	buf  []byte
	done func(msg string)
}

var failureStatus = []byte("\x12\x07Failure\x1a")

func (e *errorScanner) Read(p []byte) (int, error) {
	n, err := e.body.Read(p)
	if e.done == nil {
		return n, err
	}
	e.buf = append(e.buf, p[:n]...)
	if i := bytes.Index(e.buf, []byte("\x05ERROR")); i >= 0 {
		if j := bytes.Index(e.buf[i:], failureStatus); j >= 0 {
			k := i + j + len(failureStatus)
			if k < len(e.buf) && int(e.buf[k]) < 0x80 && k+1+int(e.buf[k]) <= len(e.buf) {
				e.done(string(e.buf[k+1 : k+1+int(e.buf[k])]))
				e.done = nil
			}
		}
	} else if len(e.buf) > 4096 {
		e.buf = e.buf[len(e.buf)-64:] // an event is whole once it is read; keep a tail
	}
	return n, err
}

func (e *errorScanner) Close() error { return e.body.Close() }

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (c *cluster) startInformer(ctx context.Context) (*migInformer, error) {
	mi := &migInformer{stop: make(chan struct{})}
	config := rest.CopyConfig(c.config)
	config.WrapTransport = func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(r *http.Request) (*http.Response, error) {
			if r.URL.Path != "/api/v1/configmaps" {
				return rt.RoundTrip(r)
			}
			q := r.URL.Query()
			watching := q.Get("watch") == "true" || q.Get("watch") == "1"
			req := apiRequest{at: time.Now(), list: !watching || q.Get("sendInitialEvents") == "true", rv: q.Get("resourceVersion")}
			resp, err := rt.RoundTrip(r)
			if resp != nil {
				req.status = resp.StatusCode
			}
			req.err = err
			mi.mu.Lock()
			i := len(mi.requests)
			mi.requests = append(mi.requests, req)
			mi.mu.Unlock()
			if watching && resp != nil && resp.StatusCode == http.StatusOK {
				resp.Body = &errorScanner{body: resp.Body, done: func(msg string) {
					mi.mu.Lock()
					mi.requests[i].watchErr = msg
					mi.mu.Unlock()
				}}
			}
			return resp, err
		})
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return nil, err
	}
	factory := informers.NewSharedInformerFactory(client, 0)
	mi.informer = factory.Core().V1().ConfigMaps().Informer()
	count := func() { mi.mu.Lock(); mi.handled++; mi.mu.Unlock() }
	if _, err := mi.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { count() },
		UpdateFunc: func(any, any) { count() },
		DeleteFunc: func(any) { count() },
	}); err != nil {
		return nil, err
	}
	factory.Start(mi.stop)
	syncCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), mi.informer.HasSynced) {
		close(mi.stop)
		return nil, errors.New("the ConfigMap informer did not sync within a minute")
	}
	return mi, nil
}

func (mi *migInformer) requestsSince(t time.Time) []apiRequest {
	mi.mu.Lock()
	defer mi.mu.Unlock()
	var out []apiRequest
	for _, r := range mi.requests {
		if !r.at.Before(t) {
			out = append(out, r)
		}
	}
	return out
}

// rvIn is the resourceVersion of namespace/name in the informer's store (0
// when absent).
func (mi *migInformer) rvIn(nsName string) int64 {
	obj, ok, err := mi.informer.GetStore().GetByKey(nsName)
	if err != nil || !ok {
		return 0
	}
	cm, ok := obj.(*corev1.ConfigMap)
	if !ok {
		return 0
	}
	return rvOf(cm)
}

// migResult is what one run measured.
type migResult struct {
	baseline bool
	// Cutover timeline.
	lastWrite, apiStopped, cutOver, pgetcdServing, apiStarted, apiReady, firstWrite time.Time
	// Migration.
	copyTook  time.Duration // from pgetcd migrate's start to "following"
	lagReport string        // its last "following" line before the cutover
	revision  int64         // "cut over at revision N"
	startRev  int64         // the keyspace's revision when pgetcd served
	firstRV   int64         // the resourceVersion of the first write after the cutover
	// Load.
	writes, failed int
	errs           map[string]int
	// The informer.
	listsBefore int // its lists before the cutover (the first sync)
	after       []apiRequest
	// What was compared.
	objects, applied int
	keys, revisions  int
	leases           int
	// The source's writes by revision ("REV TYPE KEY"), up to the cutover.
	writesAt map[int64][]string
	problems []string
}

func (r *migResult) fail(format string, args ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
	logf("FAIL "+format, args...)
}

var ansi = regexp.MustCompile("\x1b\\[[0-9;]*m")

// logLines is p's log without terminal colours.
func logLines(p *proc) []string {
	data, _ := os.ReadFile(p.log)
	return strings.Split(ansi.ReplaceAllString(string(data), ""), "\n")
}

// waitFast polls check every 20 ms (waitFor's 200 ms would blur the timings).
func waitFast(ctx context.Context, what string, timeout time.Duration, check func() error) error {
	return pollEvery(ctx, what, timeout, 20*time.Millisecond, check)
}

// serving waits until url accepts TCP connections and answers a Get, and
// returns the revision of that answer.
func (c *cluster) serving(ctx context.Context, url string, p *proc) (int64, error) {
	var rev int64
	err := waitFast(ctx, p.name+" serving", time.Minute, func() error {
		if !p.running() {
			return fmt.Errorf("%s exited:\n%s", p.name, p.tail(20))
		}
		conn, err := net.DialTimeout("tcp", strings.TrimPrefix(url, "https://"), time.Second)
		if err != nil {
			return err
		}
		conn.Close()
		cli, err := c.etcdClientAt(url)
		if err != nil {
			return err
		}
		defer cli.Close()
		gctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		resp, err := cli.Get(gctx, "/registry/health")
		if err != nil {
			return err
		}
		rev = resp.Header.Revision
		return nil
	})
	return rev, err
}

// setArg replaces the value of flag in args.
func setArg(args []string, flag, value string) error {
	for i := range args[:len(args)-1] {
		if args[i] == flag {
			args[i+1] = value
			return nil
		}
	}
	return fmt.Errorf("no %s among %v", flag, args)
}

// runMigration runs one migration (or, with o.baseline, one restart of
// kube-apiserver on etcd) on the started cluster c.
func (c *cluster) runMigration(ctx context.Context, o migrateOptions) (*migResult, error) {
	res := &migResult{baseline: o.baseline, errs: map[string]int{}}
	etcdURL := c.storageURL
	t0 := time.Now()
	w, err := c.createWorkload(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("creating the workload: %w", err)
	}
	logf("workload: %d namespaces, %d ConfigMaps, %d Leases, %d Events in %.1f s",
		len(w.namespaces), len(w.configMaps), len(w.leases), o.events, time.Since(t0).Seconds())
	mi, err := c.startInformer(ctx)
	if err != nil {
		return nil, err
	}
	defer close(mi.stop)
	res.listsBefore = len(slices.DeleteFunc(mi.requestsSince(time.Time{}), func(r apiRequest) bool { return !r.list }))

	load, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	mw := &migWriter{c: c, w: w}
	loadDone := make(chan struct{})
	go func() { mw.run(load, o.rate); close(loadDone) }()
	logf("load: %.0f writes/s (ConfigMap patches; a Lease renewal and an Event create in every 20)", o.rate)

	var migrate, pgetcd *proc
	// kube-apiserver before its storage.
	defer func() { c.stop(); migrate.kill(); pgetcd.stop() }()
	var pgURL string
	if !o.baseline {
		if pgURL, err = c.startPostgres(); err != nil {
			return nil, err
		}
		p := c.pki.path
		started := time.Now()
		migrate, err = startProc(c.opts.dir, "pgetcd-migrate", c.opts.pgetcd, "migrate",
			"--from", etcdURL,
			"--from-cacert", p("ca.crt"), "--from-cert", p("apiserver-etcd-client.crt"), "--from-key", p("apiserver-etcd-client.key"),
			"--postgres-url", pgURL, "--keyspace", migKeyspace, "--freeze-source")
		if err != nil {
			return nil, err
		}
		if err := waitFast(ctx, "pgetcd migrate following", 2*time.Minute, func() error {
			if !migrate.running() {
				return fmt.Errorf("pgetcd migrate exited:\n%s", migrate.tail(20))
			}
			for _, l := range logLines(migrate) {
				if strings.Contains(l, "following the source") {
					return nil
				}
			}
			return errors.New("not following yet")
		}); err != nil {
			return nil, err
		}
		res.copyTook = time.Since(started)
		logf("pgetcd migrate follows etcd, %.2f s after its start; following for %s under the load", res.copyTook.Seconds(), o.follow)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(o.follow):
		}
		for _, l := range logLines(migrate) {
			if i := strings.Index(l, "migrate: following applied="); i >= 0 {
				res.lagReport = l[i+len("migrate: following "):]
			}
		}
		logf("pgetcd migrate: %s", res.lagReport)
	} else {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(o.follow):
		}
	}

	before, err := c.listWorkload(ctx, w)
	if err != nil {
		return nil, fmt.Errorf("listing before the cutover: %w", err)
	}
	listedAt := time.Now()

	// The cutover.
	c.apiserver.stop()
	res.apiStopped = time.Now()
	logf("kube-apiserver stopped")
	if !o.baseline {
		if err := migrate.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			return nil, err
		}
		select {
		case <-migrate.done:
		case <-time.After(2 * time.Minute):
			return nil, fmt.Errorf("pgetcd migrate did not exit within 2 minutes of its SIGTERM:\n%s", migrate.tail(20))
		}
		res.cutOver = time.Now()
		if code := migrate.cmd.ProcessState.ExitCode(); code != 0 {
			return nil, fmt.Errorf("pgetcd migrate exited %d:\n%s", code, migrate.tail(20))
		}
		for _, l := range logLines(migrate) {
			if m := regexp.MustCompile(`cut over at revision ([0-9]+)`).FindStringSubmatch(l); m != nil {
				res.revision, _ = strconv.ParseInt(m[1], 10, 64)
			}
		}
		if res.revision == 0 {
			return nil, fmt.Errorf("pgetcd migrate did not say where it cut over:\n%s", migrate.tail(20))
		}
		logf("pgetcd migrate cut over at revision %d", res.revision)
		url := "https://127.0.0.1:" + strconv.Itoa(freePort())
		p := c.pki.path
		pgetcd, err = startProc(c.opts.dir, "pgetcd", c.opts.pgetcd,
			"--postgres-url", pgURL, "--keyspace", migKeyspace,
			"--listen-client-urls", url, "--advertise-client-urls", url,
			"--listen-metrics-urls", "http://127.0.0.1:"+strconv.Itoa(freePort()),
			"--cert-file", p("storage.crt"), "--key-file", p("storage.key"),
			"--trusted-ca-file", p("ca.crt"), "--client-cert-auth")
		if err != nil {
			return nil, err
		}
		if res.startRev, err = c.serving(ctx, url, pgetcd); err != nil {
			return nil, err
		}
		res.pgetcdServing = time.Now()
		logf("pgetcd serves the keyspace at %s, revision %d", url, res.startRev)
		if err := setArg(c.apiserver.args, "--etcd-servers", url); err != nil {
			return nil, err
		}
		c.storageURL = url
	}
	readyClient, err := adminHTTPClient(c.pki, time.Second)
	if err != nil {
		return nil, err
	}
	res.apiStarted = time.Now()
	if err := c.apiserver.start(); err != nil {
		return nil, err
	}
	if err := waitFast(ctx, "kube-apiserver ready", 2*time.Minute, func() error {
		if !c.apiserver.running() {
			return fmt.Errorf("kube-apiserver exited:\n%s", c.apiserver.tail(30))
		}
		resp, err := readyClient.Get(c.apiURL + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return errors.New(resp.Status)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	res.apiReady = time.Now()
	logf("kube-apiserver ready on %s", c.storageURL)
	if err := waitFast(ctx, "a successful write after the cutover", time.Minute, func() error {
		if firstSuccessAfter(mw.snapshot(), res.apiStopped).IsZero() {
			return errors.New("none yet")
		}
		return nil
	}); err != nil {
		return nil, err
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(o.after):
	}
	stopLoad()
	<-loadDone
	writes := mw.snapshot()
	res.lastWrite = lastSuccessBefore(writes, res.apiStopped)
	res.firstWrite = firstSuccessAfter(writes, res.apiStopped)
	for _, q := range writes {
		res.writes++
		if q.err != nil {
			res.failed++
			res.errs[digits.ReplaceAllString(strings.ReplaceAll(q.err.Error(), q.key[strings.LastIndexByte(q.key, '/')+1:], "NAME"), "N")]++
		}
		if q.err == nil && q.end.Equal(res.firstWrite) {
			res.firstRV = q.obj.rv
		}
	}
	logf("load done: %d writes, %d failed; no write succeeded for %.2f s", res.writes, res.failed, res.firstWrite.Sub(res.lastWrite).Seconds())

	// The objects: what the list before the cutover and the acknowledged
	// writes since say, against a list now.
	expected := before
	failedAfter := map[string]bool{} // a write failed after the object's last acknowledged state
	sort.Slice(writes, func(i, j int) bool { return writes[i].end.Before(writes[j].end) })
	for _, q := range writes {
		if q.err != nil {
			if q.end.After(listedAt) {
				failedAfter[q.key] = true
			}
			continue
		}
		if q.obj.rv > expected[q.key].rv {
			expected[q.key] = q.obj
			delete(failedAfter, q.key)
		}
	}
	after, err := c.listWorkload(ctx, w)
	if err != nil {
		return nil, fmt.Errorf("listing after the cutover: %w", err)
	}
	res.objects = len(after)
	var wrong []string
	for key, want := range expected {
		got, ok := after[key]
		switch {
		case !ok && failedAfter[key]:
			// A create whose outcome is unknown: not applied.
		case !ok:
			wrong = append(wrong, key+": gone")
		case got.rv > want.rv && failedAfter[key]:
			res.applied++ // a write that failed had been applied
		case got != want:
			wrong = append(wrong, fmt.Sprintf("%s: resourceVersion %d, want %d (content equal: %v)", key, got.rv, want.rv, got.json == want.json))
		}
	}
	for key := range after {
		if _, ok := expected[key]; !ok && !failedAfter[key] {
			wrong = append(wrong, key+": not there before, not written since")
		}
	}
	sort.Strings(wrong)
	if len(wrong) > 0 {
		res.fail("%d objects not what they were before the cutover: %s", len(wrong), firstFew(wrong))
	}
	if !o.baseline {
		if res.startRev != res.revision {
			res.fail("pgetcd served revision %d at its start, migrate cut over at %d", res.startRev, res.revision)
		}
		if res.firstRV <= res.revision {
			res.fail("the first write after the cutover got resourceVersion %d, not after %d", res.firstRV, res.revision)
		}
		if err := c.compareStores(ctx, etcdURL, res); err != nil {
			return nil, err
		}
	}

	// The informer: it must have caught up with every acknowledged write and
	// hold what a list holds.
	if err := waitFor(ctx, "the informer at every acknowledged ConfigMap write", time.Minute, func() error {
		for key, obj := range expected {
			if nsName, ok := strings.CutPrefix(key, "configmaps/"); ok && mi.rvIn(nsName) < obj.rv {
				return fmt.Errorf("%s at %d, acknowledged %d", nsName, mi.rvIn(nsName), obj.rv)
			}
		}
		return nil
	}); err != nil {
		res.fail("%v", err)
	}
	for key, obj := range after {
		if nsName, ok := strings.CutPrefix(key, "configmaps/"); ok && mi.rvIn(nsName) != obj.rv {
			res.fail("the informer holds %s at %d, a list at %d", nsName, mi.rvIn(nsName), obj.rv)
		}
	}
	res.after = mi.requestsSince(res.apiStopped)
	return res, nil
}

// compareStores compares etcd and pgetcd at the cutover revision: the keys
// (everything a KeyValue holds), the watch history from revision 1 and the
// granted TTLs of the keys' leases.
func (c *cluster) compareStores(ctx context.Context, etcdURL string, res *migResult) error {
	src, err := c.etcdClientAt(etcdURL)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := c.etcdClientAt(c.storageURL)
	if err != nil {
		return err
	}
	defer dst.Close()
	rev := res.revision
	get := func(cli *clientv3.Client) (map[string]*mvccpb.KeyValue, error) {
		resp, err := cli.Get(ctx, "\x00", clientv3.WithFromKey(), clientv3.WithRev(rev))
		if err != nil {
			return nil, err
		}
		out := map[string]*mvccpb.KeyValue{}
		for _, kv := range resp.Kvs {
			out[string(kv.Key)] = kv
		}
		return out, nil
	}
	a, err := get(src)
	if err != nil {
		return fmt.Errorf("etcd at revision %d: %w", rev, err)
	}
	b, err := get(dst)
	if err != nil {
		return fmt.Errorf("pgetcd at revision %d: %w", rev, err)
	}
	res.keys = len(a)
	var diff []string
	leases := map[int64]bool{}
	for k, kv := range a {
		other, ok := b[k]
		if !ok {
			diff = append(diff, k+": not in pgetcd")
			continue
		}
		if string(kv.Value) != string(other.Value) || kv.CreateRevision != other.CreateRevision ||
			kv.ModRevision != other.ModRevision || kv.Version != other.Version || kv.Lease != other.Lease {
			diff = append(diff, fmt.Sprintf("%s: etcd create %d mod %d version %d lease %x, pgetcd create %d mod %d version %d lease %x",
				k, kv.CreateRevision, kv.ModRevision, kv.Version, kv.Lease, other.CreateRevision, other.ModRevision, other.Version, other.Lease))
		}
		if kv.Lease != 0 {
			leases[kv.Lease] = true
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			diff = append(diff, k+": only in pgetcd")
		}
	}
	sort.Strings(diff)
	if len(diff) > 0 {
		res.fail("%d keys differ at revision %d: %s", len(diff), rev, firstFew(diff))
	}

	res.writesAt = map[int64][]string{}
	history := func(cli *clientv3.Client) ([]string, error) {
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		wc := cli.Watch(wctx, "\x00", clientv3.WithFromKey(), clientv3.WithRev(1), clientv3.WithPrevKV())
		var out []string
		timeout := time.After(time.Minute)
		var quiet <-chan time.Time
		for {
			select {
			case r, ok := <-wc:
				if !ok {
					return out, errors.New("the watch closed")
				}
				if err := r.Err(); err != nil {
					return out, err
				}
				for _, ev := range r.Events {
					if ev.Kv.ModRevision > rev {
						return out, nil
					}
					prev := ""
					if ev.PrevKv != nil {
						prev = fmt.Sprintf(" prev mod %d", ev.PrevKv.ModRevision)
					}
					out = append(out, fmt.Sprintf("%d %s %q create %d version %d lease %x value %x%s",
						ev.Kv.ModRevision, ev.Type, ev.Kv.Key, ev.Kv.CreateRevision, ev.Kv.Version, ev.Kv.Lease, sha(ev.Kv.Value), prev))
					if cli == src {
						res.writesAt[ev.Kv.ModRevision] = append(res.writesAt[ev.Kv.ModRevision], fmt.Sprintf("%s %s", ev.Type, ev.Kv.Key))
					}
					if ev.Kv.ModRevision == rev {
						quiet = time.After(500 * time.Millisecond)
					}
				}
			case <-quiet:
				return out, nil // etcd, frozen, writes nothing after rev
			case <-timeout:
				return out, fmt.Errorf("no event at revision %d within a minute", rev)
			}
		}
	}
	ha, err := history(src)
	if err != nil {
		return fmt.Errorf("etcd's history: %w", err)
	}
	hb, err := history(dst)
	if err != nil {
		return fmt.Errorf("pgetcd's history: %w", err)
	}
	res.revisions = len(ha)
	if !slices.Equal(ha, hb) {
		i := 0
		for i < len(ha) && i < len(hb) && ha[i] == hb[i] {
			i++
		}
		at := func(h []string) string {
			if i < len(h) {
				return h[i]
			}
			return "(end)"
		}
		res.fail("watch histories from revision 1 differ: %d events on etcd, %d on pgetcd; event %d: etcd %s, pgetcd %s", len(ha), len(hb), i, at(ha), at(hb))
	}

	for id := range leases {
		s, err := src.TimeToLive(ctx, clientv3.LeaseID(id))
		if err != nil || s.TTL < 0 {
			continue // gone from etcd since
		}
		d, err := dst.TimeToLive(ctx, clientv3.LeaseID(id))
		if err != nil || d.TTL < 0 {
			res.fail("lease %x of a key at revision %d: not in pgetcd (%v)", id, rev, err)
			continue
		}
		if s.GrantedTTL != d.GrantedTTL {
			res.fail("lease %x: granted TTL %d on etcd, %d on pgetcd", id, s.GrantedTTL, d.GrantedTTL)
		}
		res.leases++
	}
	logf("etcd and pgetcd at revision %d: %d keys, %d events from revision 1, %d leases of keys compared", rev, res.keys, res.revisions, res.leases)
	return nil
}

func sha(b []byte) string {
	// Short and enough to tell values apart in a message: FNV-1a.
	h := uint64(14695981039346656037)
	for _, c := range b {
		h ^= uint64(c)
		h *= 1099511628211
	}
	return strconv.FormatUint(h, 16)
}

// runMigrations runs o.runs migrations, each on a fresh cluster under
// dir/run-N, prints each and a summary, and reports whether all passed.
func runMigrations(ctx context.Context, base options, o migrateOptions) bool {
	if o.namespaces < 1 || o.configMaps < 1 || o.leases < 1 || o.rate <= 0 {
		fmt.Println("-migrate needs a namespace, a ConfigMap, a Lease and a rate")
		return false
	}
	if err := os.RemoveAll(base.dir); err != nil {
		fmt.Println(err)
		return false
	}
	base.backend = "etcd"
	// Nothing expires or is compacted between the two lists: kube-apiserver's
	// defaults (Events live an hour, compaction every 5 minutes).
	base.eventTTL = time.Hour
	base.compaction = 5 * time.Minute
	if o.retryAfter {
		base.apiArgs = append(base.apiArgs, "--shutdown-send-retry-after=true")
	}
	var results []*migResult
	ok := true
	for i := 1; i <= o.runs; i++ {
		opts := base
		opts.dir = filepath.Join(base.dir, fmt.Sprintf("run-%d", i))
		logf("run %d of %d: control plane on etcd in %s", i, o.runs, opts.dir)
		c, err := startCluster(ctx, opts)
		if err != nil {
			fmt.Printf("run %d: the control plane did not start: %v\n", i, err)
			return false
		}
		res, err := c.runMigration(ctx, o)
		c.stop()
		if err != nil {
			fmt.Printf("run %d failed: %v\n", i, err)
			return false
		}
		res.print(i)
		ok = ok && len(res.problems) == 0
		results = append(results, res)
	}
	printMigrationSummary(results)
	what := "migrate"
	if o.baseline {
		what = "migrate baseline (kube-apiserver restarted on etcd)"
	}
	if ok {
		fmt.Printf("%s: %d runs passed\n", what, len(results))
	} else {
		fmt.Printf("%s: FAILED\n", what)
	}
	return ok
}

// segments is the write-unavailability window split into its steps.
func (r *migResult) segments() []struct {
	name string
	d    time.Duration
} {
	type seg = struct {
		name string
		d    time.Duration
	}
	out := []seg{{"window", r.firstWrite.Sub(r.lastWrite)}, {"apiserver stop", r.apiStopped.Sub(r.lastWrite)}}
	if !r.baseline {
		out = append(out, seg{"migrate cutover", r.cutOver.Sub(r.apiStopped)}, seg{"pgetcd start", r.pgetcdServing.Sub(r.cutOver)})
	}
	return append(out,
		seg{"apiserver start to /readyz", r.apiReady.Sub(r.apiStarted)},
		seg{"apiserver start to first write", r.firstWrite.Sub(r.apiStarted)})
}

func (r *migResult) print(run int) {
	var parts []string
	for _, s := range r.segments() {
		parts = append(parts, fmt.Sprintf("%s %.2f s", s.name, s.d.Seconds()))
	}
	fmt.Printf("run %d: %s\n", run, strings.Join(parts, "; "))
	if !r.baseline {
		fmt.Printf("run %d: pgetcd migrate following %.2f s after its start; its last lag report %s; cut over at revision %d; pgetcd at %d when serving; first write after at %d\n",
			run, r.copyTook.Seconds(), r.lagReport, r.revision, r.startRev, r.firstRV)
		fmt.Printf("run %d: etcd and pgetcd at revision %d: %d keys, %d events from revision 1, %d leases compared\n", run, r.revision, r.keys, r.revisions, r.leases)
	}
	fmt.Printf("run %d: writes %d, failed %d; objects after the cutover %d, each at its resourceVersion and content from before or from an acknowledged write (%d failed writes applied anyway)\n",
		run, r.writes, r.failed, r.objects, r.applied)
	var msgs []string
	for m, n := range r.errs {
		msgs = append(msgs, fmt.Sprintf("%d× %s", n, m))
	}
	sort.Strings(msgs)
	for _, m := range msgs {
		fmt.Printf("run %d:   error %s\n", run, m)
	}
	lists := 0
	var reqs []string
	for _, q := range r.after {
		kind := "watch"
		if q.list {
			kind = "list"
			lists++
		}
		status := strconv.Itoa(q.status)
		if q.err != nil {
			status = "error"
		}
		if q.watchErr != "" {
			status += " then ERROR " + strconv.Quote(q.watchErr)
		}
		reqs = append(reqs, fmt.Sprintf("%+.2fs %s rv=%q %s", q.at.Sub(r.apiStarted).Seconds(), kind, q.rv, status))
	}
	fmt.Printf("run %d: informer: %d list before the cutover; after the apiserver stopped %d lists, %d requests (times from the apiserver's start): %s\n",
		run, r.listsBefore, lists, len(r.after), strings.Join(reqs, ", "))
	// What the source wrote after the informer's last ConfigMap event, up to
	// the cutover: the revisions a restarted watch cache does not have.
	if len(r.after) > 0 && r.writesAt != nil {
		from, _ := strconv.ParseInt(r.after[0].rv, 10, 64)
		var w []string
		for rev := from + 1; rev <= r.revision; rev++ {
			for _, e := range r.writesAt[rev] {
				w = append(w, fmt.Sprintf("%d %s", rev, e))
			}
		}
		fmt.Printf("run %d: etcd's writes after the informer's resourceVersion %d: %s\n", run, from, strings.Join(w, ", "))
	}
	if len(r.problems) > 0 {
		fmt.Printf("run %d: FAILED: %s\n", run, strings.Join(r.problems, "; "))
	}
}

func printMigrationSummary(results []*migResult) {
	if len(results) == 0 {
		return
	}
	for i, s := range results[0].segments() {
		var ds []float64
		for _, r := range results {
			ds = append(ds, r.segments()[i].d.Seconds())
		}
		sort.Float64s(ds)
		fmt.Printf("%-32s min %.2f s  median %.2f s  max %.2f s\n", s.name, ds[0], ds[len(ds)/2], ds[len(ds)-1])
	}
}
