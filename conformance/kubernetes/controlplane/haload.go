package main

// The high-availability scenario (-ha N): kube-apiserver with --etcd-servers
// listing N pgetcd instances of one keyspace (ha.go). Workers create and update
// ConfigMaps in one namespace through client-go at a steady rate while the
// harness finds the writer (Maintenance Status), kills it with SIGKILL,
// restarts it after a few seconds (it rejoins as a follower) and kills the
// next writer. Every request's outcome and time is recorded. Then it checks:
//
//   - nothing lost: every object whose create or update kube-apiserver
//     acknowledged (or that a read after a failed request showed) is in a list
//     from storage with that content and resourceVersion, and its etcd key has
//     that mod revision;
//   - a watch opened before the first kill (re-opened from its last
//     resourceVersion whenever it closes, relisting only on 410 Gone, as a
//     reflector does) delivered every acknowledged write, in strictly
//     increasing resourceVersion order;
//   - kube-apiserver's /readyz is OK again after the last kill.
//
// It prints the requests, the errors the load clients saw by message, the
// longest time no create succeeded, and each kill's take-over.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
)

// haOptions shape the load and the kills.
type haOptions struct {
	duration  time.Duration // of the load
	workers   int
	rate      float64 // requests per second per worker, creates and updates alternating
	kills     int
	warmup    time.Duration // load before the first kill
	killEvery time.Duration // from one kill to the next
	down      time.Duration // how long a killed writer stays down
}

// haNS is the namespace the load writes in.
const haNS = "ha-load"

// request is one request of a load worker.
type request struct {
	verb       string // create, update, get
	name       string
	start, end time.Time
	err        error
}

// state is a state of one object that kube-apiserver acknowledged: the answer
// to a create or update, or a read after one failed.
type state struct {
	rv   int64
	data map[string]string
}

// haRecord is what the workers record, shared.
type haRecord struct {
	mu       sync.Mutex
	requests []request
	acked    map[string]bool  // "name@rv" of every acknowledged state
	last     map[string]state // the last acknowledged state of each object
	unsure   map[string]bool  // objects whose create failed: outcome unknown
	// The content of an update that failed after the object's last
	// acknowledged state: it may have been applied all the same.
	pending  map[string]map[string]string
	vanished []string // a read found no object that had been acknowledged
}

func (r *haRecord) add(q request) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.requests = append(r.requests, q)
}

func (r *haRecord) ack(name string, s state) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.acked[fmt.Sprintf("%s@%d", name, s.rv)] = true
	r.last[name] = s
	delete(r.unsure, name)
	delete(r.pending, name)
}

// haWorker creates ConfigMaps of its own and updates them in turn.
type haWorker struct {
	id      int
	c       *cluster
	rec     *haRecord
	names   []string         // its objects whose create was acknowledged
	known   map[string]state // their last acknowledged state
	dirty   map[string]bool  // a request on it failed: read it before updating it
	next    int              // the next of names to update
	created int
}

func content(worker, seq int) map[string]string {
	return map[string]string{"worker": strconv.Itoa(worker), "seq": strconv.Itoa(seq)}
}

func rvOf(obj interface{ GetResourceVersion() string }) int64 {
	rv, _ := strconv.ParseInt(obj.GetResourceVersion(), 10, 64)
	return rv
}

func (w *haWorker) run(ctx context.Context, until time.Time, rate float64) {
	tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if time.Now().After(until) {
			return
		}
		if i%2 == 0 || len(w.names) == 0 {
			w.create(ctx)
		} else {
			w.update(ctx)
		}
	}
}

// do runs one request with a 30 s deadline and records it.
func (w *haWorker) do(ctx context.Context, verb, name string, f func(context.Context) (*corev1.ConfigMap, error)) (*corev1.ConfigMap, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	q := request{verb: verb, name: name, start: time.Now()}
	cm, err := f(ctx)
	q.end, q.err = time.Now(), err
	w.rec.add(q)
	return cm, err
}

func (w *haWorker) create(ctx context.Context) {
	cms := w.c.client.CoreV1().ConfigMaps(haNS)
	name := fmt.Sprintf("w%d-%05d", w.id, w.created)
	w.created++
	data := content(w.id, 0)
	cm, err := w.do(ctx, "create", name, func(ctx context.Context) (*corev1.ConfigMap, error) {
		return cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name}, Data: data}, metav1.CreateOptions{})
	})
	if err != nil {
		w.rec.mu.Lock()
		w.rec.unsure[name] = true
		w.rec.mu.Unlock()
		return
	}
	s := state{rv: rvOf(cm), data: data}
	w.names = append(w.names, name)
	w.known[name] = s
	w.rec.ack(name, s)
}

func (w *haWorker) update(ctx context.Context) {
	cms := w.c.client.CoreV1().ConfigMaps(haNS)
	name := w.names[w.next%len(w.names)]
	w.next++
	if w.dirty[name] {
		cm, err := w.do(ctx, "get", name, func(ctx context.Context) (*corev1.ConfigMap, error) {
			return cms.Get(ctx, name, metav1.GetOptions{})
		})
		if apierrors.IsNotFound(err) {
			w.rec.mu.Lock()
			w.rec.vanished = append(w.rec.vanished, name)
			w.rec.mu.Unlock()
			w.dirty[name] = false
			return
		}
		if err != nil {
			return
		}
		s := state{rv: rvOf(cm), data: cm.Data}
		w.known[name] = s
		w.rec.ack(name, s)
		w.dirty[name] = false
	}
	prev := w.known[name]
	seq, _ := strconv.Atoi(prev.data["seq"])
	data := content(w.id, seq+1)
	cm, err := w.do(ctx, "update", name, func(ctx context.Context) (*corev1.ConfigMap, error) {
		return cms.Update(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: strconv.FormatInt(prev.rv, 10)},
			Data:       data,
		}, metav1.UpdateOptions{})
	})
	if err != nil {
		w.dirty[name] = true
		w.rec.mu.Lock()
		w.rec.pending[name] = data
		w.rec.mu.Unlock()
		return
	}
	s := state{rv: rvOf(cm), data: data}
	w.known[name] = s
	w.rec.ack(name, s)
}

// haWatch is a watch on the load's namespace, opened before the first kill
// and kept open the way a reflector does.
type haWatch struct {
	mu         sync.Mutex
	seen       map[string]bool // "name@rv" of every event
	events     int
	lastRV     int64
	outOfOrder []string
	reopened   int
	relists    []listing // after the first list: each after a 410 Gone
}

// listing is one list the watch started from.
type listing struct {
	rv      int64
	objects map[string]int64
}

func (h *haWatch) lastSeen() int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lastRV
}

// run lists, then watches from the list's resourceVersion; a closed watch is
// opened again from the last resourceVersion it delivered, a 410 Gone lists
// again. Until ctx is done.
func (h *haWatch) run(ctx context.Context, c *cluster, listed chan<- error) {
	cms := c.client.CoreV1().ConfigMaps(haNS)
	relist, first := true, true
	for ctx.Err() == nil {
		if relist {
			list, err := cms.List(ctx, metav1.ListOptions{})
			if err != nil {
				if first {
					listed <- err
					return
				}
				time.Sleep(200 * time.Millisecond)
				continue
			}
			l := listing{rv: rvOf(&list.ListMeta), objects: map[string]int64{}}
			for i := range list.Items {
				l.objects[list.Items[i].Name] = rvOf(&list.Items[i])
			}
			h.mu.Lock()
			h.lastRV = l.rv
			if !first {
				h.relists = append(h.relists, l)
			}
			h.mu.Unlock()
			relist = false
		}
		w, err := cms.Watch(ctx, metav1.ListOptions{ResourceVersion: strconv.FormatInt(h.lastSeen(), 10), AllowWatchBookmarks: true})
		if first {
			listed <- err
			first = false
			if err != nil {
				return
			}
		}
		if err != nil {
			relist = apierrors.IsGone(err) || apierrors.IsResourceExpired(err)
			time.Sleep(200 * time.Millisecond)
			continue
		}
		for ev := range w.ResultChan() {
			if ev.Type == watch.Error {
				err := apierrors.FromObject(ev.Object)
				relist = relist || apierrors.IsGone(err) || apierrors.IsResourceExpired(err)
				continue
			}
			obj, err := meta.Accessor(ev.Object)
			if err != nil {
				continue
			}
			rv := rvOf(obj)
			h.mu.Lock()
			if ev.Type != watch.Bookmark {
				if rv <= h.lastRV {
					h.outOfOrder = append(h.outOfOrder, fmt.Sprintf("%s %s@%d after %d", ev.Type, obj.GetName(), rv, h.lastRV))
				}
				h.seen[fmt.Sprintf("%s@%d", obj.GetName(), rv)] = true
				h.events++
			}
			if rv > h.lastRV {
				h.lastRV = rv
			}
			h.mu.Unlock()
		}
		w.Stop()
		if ctx.Err() == nil {
			h.mu.Lock()
			h.reopened++
			h.mu.Unlock()
		}
	}
}

// readiness polls kube-apiserver's /readyz and keeps the intervals it failed.
type readiness struct {
	mu       sync.Mutex
	down     []time.Duration
	downFrom time.Time // zero while ready
}

func (r *readiness) run(ctx context.Context, c *cluster) {
	client, err := adminHTTPClient(c.pki, 2*time.Second)
	if err != nil {
		return
	}
	for ctx.Err() == nil {
		resp, err := client.Get(c.apiURL + "/readyz")
		ok := err == nil && resp.StatusCode == http.StatusOK
		if err == nil {
			resp.Body.Close()
		}
		now := time.Now()
		r.mu.Lock()
		switch {
		case !ok && r.downFrom.IsZero():
			r.downFrom = now
		case ok && !r.downFrom.IsZero():
			r.down = append(r.down, now.Sub(r.downFrom))
			r.downFrom = time.Time{}
		}
		r.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func adminHTTPClient(p *pki, timeout time.Duration) (*http.Client, error) {
	cert, err := tls.LoadX509KeyPair(p.path("admin.crt"), p.path("admin.key"))
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true}, //nolint:gosec // loopback harness
	}}, nil
}

// haKill is one kill of the writer.
type haKill struct {
	victim    string
	at        time.Time
	takeover  time.Duration // until another instance named itself the writer
	newWriter string
	rejoined  time.Duration // from the restart until it served again
	follower  bool          // it came back as a follower
	err       error
}

// killWriters kills the writer o.kills times, from t0+o.warmup every
// o.killEvery, and restarts each victim o.down after its kill.
func (c *cluster) killWriters(ctx context.Context, o haOptions, t0 time.Time) []haKill {
	var kills []haKill
	for k := 0; k < o.kills; k++ {
		select {
		case <-ctx.Done():
			return kills
		case <-time.After(time.Until(t0.Add(o.warmup + time.Duration(k)*o.killEvery))):
		}
		var victim *member
		if err := waitFor(ctx, "a writer", 30*time.Second, func() error {
			if victim = c.writer(ctx); victim == nil {
				return errors.New("no instance names itself the writer")
			}
			return nil
		}); err != nil {
			kills = append(kills, haKill{err: err})
			continue
		}
		kl := haKill{victim: victim.name, at: time.Now()}
		victim.proc.kill()
		logf("killed the writer %s (SIGKILL)", victim.name)
		if err := waitFor(ctx, "a new writer", 30*time.Second, func() error {
			w := c.writer(ctx)
			if w == nil || w == victim {
				return errors.New("no other instance names itself the writer")
			}
			kl.newWriter = w.name
			return nil
		}); err != nil {
			kl.err = err
		}
		kl.takeover = time.Since(kl.at)
		logf("%s writes, %.2f s after the kill", kl.newWriter, kl.takeover.Seconds())
		time.Sleep(time.Until(kl.at.Add(o.down)))
		restart := time.Now()
		if err := victim.proc.start(); err != nil {
			kl.err = errors.Join(kl.err, err)
		} else if err := c.waitMember(ctx, victim); err != nil {
			kl.err = errors.Join(kl.err, err)
		}
		kl.rejoined = time.Since(restart)
		kl.follower = !c.isWriter(ctx, victim)
		logf("%s restarted, serving after %.2f s", victim.name, kl.rejoined.Seconds())
		kills = append(kills, kl)
	}
	return kills
}

// runHA runs the scenario and reports whether every check held.
func (c *cluster) runHA(ctx context.Context, o haOptions) (bool, error) {
	lastKill := o.warmup + time.Duration(o.kills-1)*o.killEvery
	if o.kills < 1 || o.workers < 1 || o.rate <= 0 || o.duration < lastKill+o.down+10*time.Second {
		return false, fmt.Errorf("the load (%s) must outlast the last kill (at %s) by its downtime (%s) and 10 s, with a kill, a worker and a rate",
			o.duration, lastKill, o.down)
	}
	if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: haNS}}, metav1.CreateOptions{}); err != nil {
		return false, err
	}
	cachesBefore, err := c.watchCacheInitializations()
	if err != nil {
		return false, err
	}
	bg, stopBg := context.WithCancel(ctx)
	defer stopBg()
	hw := &haWatch{seen: map[string]bool{}}
	listed := make(chan error, 1)
	watchDone := make(chan struct{})
	go func() { hw.run(bg, c, listed); close(watchDone) }()
	if err := <-listed; err != nil {
		return false, fmt.Errorf("the watch: %w", err)
	}
	ready := &readiness{}
	readyDone := make(chan struct{})
	go func() { ready.run(bg, c); close(readyDone) }()

	rec := &haRecord{acked: map[string]bool{}, last: map[string]state{}, unsure: map[string]bool{}, pending: map[string]map[string]string{}}
	t0 := time.Now()
	until := t0.Add(o.duration)
	logf("load: %d workers at %.0f requests/s each for %s; %d kills of the writer from %s, every %s, each down %s",
		o.workers, o.rate, o.duration, o.kills, o.warmup, o.killEvery, o.down)
	var wg sync.WaitGroup
	for i := 1; i <= o.workers; i++ {
		w := &haWorker{id: i, c: c, rec: rec, known: map[string]state{}, dirty: map[string]bool{}}
		wg.Add(1)
		go func() { defer wg.Done(); w.run(ctx, until, o.rate) }()
	}
	kills := c.killWriters(ctx, o, t0)
	wg.Wait()
	end := time.Now()
	logf("load done")

	readyErr := waitFor(ctx, "kube-apiserver /readyz", 2*time.Minute, func() error {
		_, err := httpsGet(c.pki, c.apiURL+"/readyz")
		return err
	})
	var maxAck int64
	for _, s := range rec.last {
		maxAck = max(maxAck, s.rv)
	}
	watchErr := waitFor(ctx, "the watch reaching the last acknowledged write", time.Minute, func() error {
		if got := hw.lastSeen(); got < maxAck {
			return fmt.Errorf("at %d of %d", got, maxAck)
		}
		return nil
	})
	stopBg()
	<-watchDone
	<-readyDone
	cachesAfter, err := c.watchCacheInitializations()
	if err != nil {
		return false, err
	}
	lost, unsurePresent, pendingApplied, err := c.verifyNothingLost(ctx, rec)
	if err != nil {
		return false, err
	}

	ok := true
	fail := func(format string, args ...any) {
		ok = false
		logf("FAIL "+format, args...)
	}
	at := func(t time.Time) float64 { return t.Sub(t0).Seconds() }
	fmt.Printf("ha: %d pgetcd instances (watch progress notify %s), kube-apiserver --etcd-servers=%s\n",
		len(c.members), progressNotify(c.opts.progressNotify), c.storageURL)
	for i, k := range kills {
		if k.err != nil {
			fail("kill %d: %v", i+1, k.err)
			continue
		}
		resumed := firstCreateAfter(rec.requests, k.at)
		fmt.Printf("kill %d: %s at %.1f s; %s writes %.2f s later; creates succeed again %.2f s after the kill; %s serving %.2f s after its restart, a follower: %v\n",
			i+1, k.victim, at(k.at), k.newWriter, k.takeover.Seconds(), resumed.Sub(k.at).Seconds(), k.victim, k.rejoined.Seconds(), k.follower)
		if !k.follower {
			fail("kill %d: %s came back as the writer", i+1, k.victim)
		}
	}
	if len(kills) < o.kills {
		fail("%d of %d kills done", len(kills), o.kills)
	}

	verbs := map[string]int{}
	var failed []request
	for _, q := range rec.requests {
		verbs[q.verb]++
		if q.err != nil {
			failed = append(failed, q)
		}
	}
	fmt.Printf("requests: %d (%d creates, %d updates, %d reads after a failure) in %.1f s; errors: %d\n",
		len(rec.requests), verbs["create"], verbs["update"], verbs["get"], end.Sub(t0).Seconds(), len(failed))
	for _, e := range errorsByMessage(failed, t0) {
		fmt.Printf("  %4d  %s  (at %s)\n", e.count, e.message, e.when)
	}
	stall, from := longestStall(rec.requests, t0, end, "create")
	writeStall, writeFrom := longestStall(rec.requests, t0, end, "create", "update")
	fmt.Printf("longest time without a successful create: %.2f s (from %.1f s); without any successful write: %.2f s (from %.1f s)\n",
		stall.Seconds(), at(from), writeStall.Seconds(), at(writeFrom))

	var downTotal, downMax time.Duration
	for _, d := range ready.down {
		downTotal += d
		downMax = max(downMax, d)
	}
	fmt.Printf("/readyz: failed %d times, %.2f s in all, at most %.2f s at once; ready after the load: %v\n",
		len(ready.down), downTotal.Seconds(), downMax.Seconds(), readyErr == nil)
	if readyErr != nil {
		fail("%v", readyErr)
	}

	seen, viaRelist, missing := 0, 0, []string{}
	for key := range rec.acked {
		if hw.seen[key] {
			seen++
			continue
		}
		if coveredByRelist(hw.relists, key) {
			viaRelist++
			continue
		}
		missing = append(missing, key)
	}
	sort.Strings(missing)
	fmt.Printf("watch (opened before the first kill): %d acknowledged writes, %d delivered as events, %d only through a relist, %d missing; %d events, reopened %d times, relisted %d times, %d out of order\n",
		len(rec.acked), seen, viaRelist, len(missing), hw.events, hw.reopened, len(hw.relists), len(hw.outOfOrder))
	if watchErr != nil {
		fail("%v", watchErr)
	}
	if len(missing) > 0 {
		fail("the watch missed %d acknowledged writes: %s", len(missing), firstFew(missing))
	}
	if len(hw.outOfOrder) > 0 {
		fail("the watch delivered %d events out of resourceVersion order: %s", len(hw.outOfOrder), firstFew(hw.outOfOrder))
	}

	relisted, relists := 0, 0.0
	for series, v := range cachesAfter {
		if d := v - cachesBefore[series]; d > 0 {
			relisted++
			relists += d
		}
	}
	fmt.Printf("kube-apiserver watch caches that relisted during the run: %d (%.0f relists)\n", relisted, relists)

	fmt.Printf("objects: %d acknowledged, %d lost; %d creates failed: %d of them present anyway; %d objects' last update failed: %d of them applied anyway\n",
		len(rec.last), len(lost), len(rec.unsure), unsurePresent, len(rec.pending), pendingApplied)
	if len(lost) > 0 {
		fail("%d acknowledged objects lost or not at their last acknowledged state: %s", len(lost), firstFew(lost))
	}
	if len(rec.vanished) > 0 {
		fail("reads during the load found %d acknowledged objects gone: %s", len(rec.vanished), firstFew(rec.vanished))
	}
	if ok {
		fmt.Println("ha: passed")
	} else {
		fmt.Println("ha: FAILED")
	}
	return ok, nil
}

// verifyNothingLost lists the namespace from storage and reads the etcd keys
// below it: every object's last acknowledged state must be there, with that
// content, resourceVersion and mod revision. It returns what is not, and how
// many of the objects whose create failed exist anyway.
func (c *cluster) verifyNothingLost(ctx context.Context, rec *haRecord) (lost []string, unsurePresent, pendingApplied int, err error) {
	cms := c.client.CoreV1().ConfigMaps(haNS)
	objects := map[string]corev1.ConfigMap{}
	for cont := ""; ; {
		list, err := cms.List(ctx, metav1.ListOptions{Limit: 500, Continue: cont})
		if err != nil {
			return nil, 0, 0, fmt.Errorf("list from storage: %w", err)
		}
		for _, cm := range list.Items {
			objects[cm.Name] = cm
		}
		if cont = list.Continue; cont == "" {
			break
		}
	}
	cli, err := c.etcdClient()
	if err != nil {
		return nil, 0, 0, err
	}
	defer cli.Close()
	prefix := "/registry/configmaps/" + haNS + "/"
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, 0, 0, fmt.Errorf("etcd get %s: %w", prefix, err)
	}
	modRevision := map[string]int64{}
	for _, kv := range resp.Kvs {
		modRevision[strings.TrimPrefix(string(kv.Key), prefix)] = kv.ModRevision
	}
	for name, s := range rec.last {
		cm, ok := objects[name]
		if p := rec.pending[name]; ok && rvOf(&cm) > s.rv && maps.Equal(cm.Data, p) {
			s = state{rv: rvOf(&cm), data: p} // a failed update that was applied
			pendingApplied++
		}
		switch {
		case !ok:
			lost = append(lost, name+": not in the list")
		case rvOf(&cm) != s.rv || !maps.Equal(cm.Data, s.data):
			lost = append(lost, fmt.Sprintf("%s: %v at %d, acknowledged %v at %d", name, cm.Data, rvOf(&cm), s.data, s.rv))
		case modRevision[name] != s.rv:
			lost = append(lost, fmt.Sprintf("%s: etcd mod revision %d, acknowledged %d", name, modRevision[name], s.rv))
		}
	}
	sort.Strings(lost)
	for name := range rec.unsure {
		if _, ok := objects[name]; ok {
			unsurePresent++
		}
	}
	return lost, unsurePresent, pendingApplied, nil
}

// coveredByRelist says whether a list after a 410 Gone showed the object
// (key "name@rv") at that resourceVersion or later.
func coveredByRelist(relists []listing, key string) bool {
	i := strings.LastIndexByte(key, '@')
	name := key[:i]
	rv, _ := strconv.ParseInt(key[i+1:], 10, 64)
	for _, l := range relists {
		if l.rv >= rv && l.objects[name] >= rv {
			return true
		}
	}
	return false
}

// firstCreateAfter is when the first create that completed after t
// succeeded (the zero time when none did).
func firstCreateAfter(requests []request, t time.Time) time.Time {
	var first time.Time
	for _, q := range requests {
		if q.verb == "create" && q.err == nil && q.end.After(t) && (first.IsZero() || q.end.Before(first)) {
			first = q.end
		}
	}
	return first
}

// longestStall is the longest interval of [t0, end] in which no request of
// the verbs succeeded, and where it began.
func longestStall(requests []request, t0, end time.Time, verbs ...string) (time.Duration, time.Time) {
	times := []time.Time{t0, end}
	for _, q := range requests {
		for _, v := range verbs {
			if q.verb == v && q.err == nil {
				times = append(times, q.end)
			}
		}
	}
	sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
	var longest time.Duration
	from := t0
	for i := 1; i < len(times); i++ {
		if d := times[i].Sub(times[i-1]); d > longest {
			longest, from = d, times[i-1]
		}
	}
	return longest, from
}

type errorCount struct {
	message string
	count   int
	when    string
}

var digits = regexp.MustCompile(`[0-9]+`)

// errorsByMessage groups failed requests by their error, object names and
// numbers masked, most frequent first, with when they happened (seconds
// since t0).
func errorsByMessage(failed []request, t0 time.Time) []errorCount {
	type group struct {
		verbs       map[string]int
		count       int
		first, last time.Time
	}
	groups := map[string]*group{}
	for _, q := range failed {
		msg := digits.ReplaceAllString(strings.ReplaceAll(q.err.Error(), q.name, "NAME"), "N")
		g := groups[msg]
		if g == nil {
			g = &group{verbs: map[string]int{}, first: q.end, last: q.end}
			groups[msg] = g
		}
		g.count++
		g.verbs[q.verb]++
		if q.end.Before(g.first) {
			g.first = q.end
		}
		if q.end.After(g.last) {
			g.last = q.end
		}
	}
	var out []errorCount
	for msg, g := range groups {
		var verbs []string
		for v, n := range g.verbs {
			verbs = append(verbs, fmt.Sprintf("%d %s", n, v))
		}
		sort.Strings(verbs)
		out = append(out, errorCount{
			message: msg + " [" + strings.Join(verbs, ", ") + "]",
			count:   g.count,
			when:    fmt.Sprintf("%.1f-%.1f s", g.first.Sub(t0).Seconds(), g.last.Sub(t0).Seconds()),
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].count > out[j].count })
	return out
}

func progressNotify(d time.Duration) string {
	if d == 0 {
		return "pgetcd's default"
	}
	return d.String()
}

func firstFew(items []string) string {
	if len(items) > 5 {
		return strings.Join(items[:5], "; ") + fmt.Sprintf("; and %d more", len(items)-5)
	}
	return strings.Join(items, "; ")
}
