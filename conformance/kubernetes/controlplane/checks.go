package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensions "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/ptr"
)

const (
	kwokAnnotation = "kwok.x-k8s.io/node"
	harnessNS      = "harness"
)

// kwokNode is a Node that kwok manages: annotated, labelled and tainted so
// that only workloads that tolerate the taint land on it.
func kwokNode(name string) *corev1.Node {
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("32"),
		corev1.ResourceMemory: resource.MustParse("256Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:        name,
			Annotations: map[string]string{kwokAnnotation: "fake"},
			Labels:      map[string]string{"type": "kwok", "kubernetes.io/hostname": name},
		},
		Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: kwokAnnotation, Value: "fake", Effect: corev1.TaintEffectNoSchedule}}},
		Status: corev1.NodeStatus{
			Capacity: capacity, Allocatable: capacity,
			NodeInfo: corev1.NodeSystemInfo{KubeletVersion: "fake", OperatingSystem: "linux", Architecture: "amd64"},
		},
	}
}

// onKwok is what a pod needs to land on kwok's nodes.
func onKwok(spec *corev1.PodSpec) {
	spec.NodeSelector = map[string]string{"type": "kwok"}
	spec.Tolerations = []corev1.Toleration{{Key: kwokAnnotation, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}}
}

// createNodes creates n kwok nodes, `workers` at a time.
func (c *cluster) createNodes(ctx context.Context, n, workers int) error {
	names := make(chan string)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range names {
				_, err := c.client.CoreV1().Nodes().Create(ctx, kwokNode(name), metav1.CreateOptions{})
				if err != nil && !apierrors.IsAlreadyExists(err) {
					errs <- err
					return
				}
			}
		}()
	}
	go func() {
		for i := 0; i < n; i++ {
			names <- fmt.Sprintf("kwok-node-%04d", i)
		}
		close(names)
	}()
	wg.Wait()
	close(errs)
	return <-errs
}

func (c *cluster) checkNodes(ctx context.Context, n int) error {
	if err := c.createNodes(ctx, n, 20); err != nil {
		return err
	}
	return waitFor(ctx, "kwok nodes Ready", 5*time.Minute, func() error {
		nodes, err := c.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: "type=kwok"})
		if err != nil {
			return err
		}
		ready := 0
		for _, node := range nodes.Items {
			for _, cond := range node.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					ready++
				}
			}
		}
		if ready < n {
			return fmt.Errorf("%d of %d nodes Ready", ready, n)
		}
		return nil
	})
}

func (c *cluster) checkNamespace(ctx context.Context) error {
	_, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: harnessNS}}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	// The service account controller gives every namespace its default account;
	// pods cannot be created before it exists.
	return waitFor(ctx, "default service account", time.Minute, func() error {
		_, err := c.client.CoreV1().ServiceAccounts(harnessNS).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

func deployment(name string, replicas int32) *appsv1.Deployment {
	labels := map[string]string{"app": name}
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(replicas),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name: "app", Image: "registry.k8s.io/pause:3.10",
					Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
				}}},
			},
		},
	}
	onKwok(&d.Spec.Template.Spec)
	return d
}

// runningPods counts the pods of app that are bound to a node and Running.
func (c *cluster) runningPods(ctx context.Context, ns, app string) (int, error) {
	pods, err := c.client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
	if err != nil {
		return 0, err
	}
	n := 0
	for _, p := range pods.Items {
		if p.Spec.NodeName != "" && p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil {
			n++
		}
	}
	return n, nil
}

func (c *cluster) checkDeployment(ctx context.Context) error {
	if _, err := c.client.AppsV1().Deployments(harnessNS).Create(ctx, deployment("web", 5), metav1.CreateOptions{}); err != nil {
		return err
	}
	if err := waitFor(ctx, "ReplicaSet owned by the Deployment", time.Minute, func() error {
		rss, err := c.client.AppsV1().ReplicaSets(harnessNS).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return err
		}
		for _, rs := range rss.Items {
			for _, o := range rs.OwnerReferences {
				if o.Kind == "Deployment" && o.Name == "web" {
					return nil
				}
			}
		}
		return errors.New("none yet")
	}); err != nil {
		return err
	}
	return waitFor(ctx, "5 pods scheduled on kwok nodes and Running", 2*time.Minute, func() error {
		n, err := c.runningPods(ctx, harnessNS, "web")
		if err == nil && n != 5 {
			err = fmt.Errorf("%d Running", n)
		}
		return err
	})
}

func (c *cluster) checkService(ctx context.Context) error {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"},
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	created, err := c.client.CoreV1().Services(harnessNS).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	if created.Spec.ClusterIP == "" {
		return errors.New("no cluster IP allocated")
	}
	return waitFor(ctx, "EndpointSlice with the 5 ready pods", 2*time.Minute, func() error {
		slices, err := c.client.DiscoveryV1().EndpointSlices(harnessNS).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
		if err != nil {
			return err
		}
		ready := 0
		for _, s := range slices.Items {
			for _, e := range s.Endpoints {
				if e.Conditions.Ready != nil && *e.Conditions.Ready {
					ready++
				}
			}
		}
		if ready != 5 {
			return fmt.Errorf("%d ready endpoints", ready)
		}
		return nil
	})
}

func (c *cluster) checkConfigMapsAndSecrets(ctx context.Context) error {
	cms := c.client.CoreV1().ConfigMaps(harnessNS)
	cm, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "settings"}, Data: map[string]string{"a": "1"}}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	cm.Data["b"] = "2"
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return err
	}
	// An update from the old resourceVersion is a conflict, as with etcd.
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); !apierrors.IsConflict(err) {
		return fmt.Errorf("stale update: want a conflict, got %v", err)
	}
	got, err := cms.Get(ctx, "settings", metav1.GetOptions{})
	if err != nil {
		return err
	}
	if got.Data["a"] != "1" || got.Data["b"] != "2" {
		return fmt.Errorf("configmap data %v", got.Data)
	}
	secrets := c.client.CoreV1().Secrets(harnessNS)
	if _, err := secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "token"}, Data: map[string][]byte{"key": {0, 1, 2, 255}}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	s, err := secrets.Get(ctx, "token", metav1.GetOptions{})
	if err != nil {
		return err
	}
	if string(s.Data["key"]) != string([]byte{0, 1, 2, 255}) {
		return fmt.Errorf("secret data %v", s.Data)
	}
	return secrets.Delete(ctx, "token", metav1.DeleteOptions{})
}

var widgets = schema.GroupVersionResource{Group: "harness.pgetcd.dev", Version: "v1", Resource: "widgets"}

func (c *cluster) checkCRD(ctx context.Context) error {
	ext, err := apiextensions.NewForConfig(c.config)
	if err != nil {
		return err
	}
	crd := &apiextensionsv1.CustomResourceDefinition{
		ObjectMeta: metav1.ObjectMeta{Name: "widgets.harness.pgetcd.dev"},
		Spec: apiextensionsv1.CustomResourceDefinitionSpec{
			Group: widgets.Group,
			Names: apiextensionsv1.CustomResourceDefinitionNames{Plural: "widgets", Singular: "widget", Kind: "Widget", ListKind: "WidgetList"},
			Scope: apiextensionsv1.NamespaceScoped,
			Versions: []apiextensionsv1.CustomResourceDefinitionVersion{{
				Name: "v1", Served: true, Storage: true,
				Schema: &apiextensionsv1.CustomResourceValidation{OpenAPIV3Schema: &apiextensionsv1.JSONSchemaProps{
					Type: "object",
					Properties: map[string]apiextensionsv1.JSONSchemaProps{
						"spec": {Type: "object", Properties: map[string]apiextensionsv1.JSONSchemaProps{"size": {Type: "integer"}}},
					},
				}},
			}},
		},
	}
	if _, err := ext.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, crd, metav1.CreateOptions{}); err != nil {
		return err
	}
	if err := waitFor(ctx, "CRD Established", time.Minute, func() error {
		got, err := ext.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range got.Status.Conditions {
			if cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue {
				return nil
			}
		}
		return errors.New("not yet")
	}); err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(c.config)
	if err != nil {
		return err
	}
	res := dyn.Resource(widgets).Namespace(harnessNS)
	const n = 25
	for i := 0; i < n; i++ {
		obj := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "harness.pgetcd.dev/v1", "kind": "Widget",
			"metadata": map[string]any{"name": fmt.Sprintf("w%02d", i)},
			"spec":     map[string]any{"size": int64(i)},
		}}
		// The CRD's storage may take a moment to serve after Established.
		if err := waitFor(ctx, "create widget", 30*time.Second, func() error {
			_, err := res.Create(ctx, obj, metav1.CreateOptions{})
			return err
		}); err != nil {
			return err
		}
	}
	// A paginated list straight from storage (resourceVersion "" with a limit).
	seen, cont := 0, ""
	for {
		page, err := res.List(ctx, metav1.ListOptions{Limit: 10, Continue: cont})
		if err != nil {
			return err
		}
		seen += len(page.Items)
		if cont = page.GetContinue(); cont == "" {
			break
		}
	}
	if seen != n {
		return fmt.Errorf("paginated list of widgets: %d items, want %d", seen, n)
	}
	w, err := res.Get(ctx, "w07", metav1.GetOptions{})
	if err != nil {
		return err
	}
	if size, _, _ := unstructured.NestedInt64(w.Object, "spec", "size"); size != 7 {
		return fmt.Errorf("w07 size %d", size)
	}
	return res.Delete(ctx, "w07", metav1.DeleteOptions{})
}

// kubectlWatch is `kubectl get configmaps -w` running in the background.
type kubectlWatch struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	lines  []string
	closed bool // kubectl closed its output (it exited)
}

func (c *cluster) startKubectlWatch(ctx context.Context) (*kubectlWatch, error) {
	w := &kubectlWatch{cmd: exec.CommandContext(ctx, c.opts.bin+"/kubectl", "--kubeconfig", c.kubeconfig,
		"get", "configmaps", "-n", harnessNS, "--watch", "--output-watch-events")}
	out, err := w.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := w.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			w.mu.Lock()
			w.lines = append(w.lines, sc.Text())
			w.mu.Unlock()
		}
		w.mu.Lock()
		w.closed = true
		w.mu.Unlock()
	}()
	return w, nil
}

// saw waits until kubectl printed a line with all of words among its
// columns (EVENT NAME DATA AGE).
func (w *kubectlWatch) saw(ctx context.Context, timeout time.Duration, words ...string) error {
	return waitFor(ctx, fmt.Sprintf("kubectl get -w printing %q", words), timeout, func() error {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, l := range w.lines {
			columns := strings.Fields(l)
			all := true
			for _, word := range words {
				all = all && slices.Contains(columns, word)
			}
			if all {
				return nil
			}
		}
		if w.closed {
			return fmt.Errorf("kubectl exited after printing %q", w.lines)
		}
		return fmt.Errorf("printed %q", w.lines)
	})
}

// watchConfigMaps lists the harness's ConfigMaps and watches them from the
// list's resourceVersion.
func (c *cluster) watchConfigMaps(ctx context.Context) (watch.Interface, error) {
	cms := c.client.CoreV1().ConfigMaps(harnessNS)
	list, err := cms.List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	return cms.Watch(ctx, metav1.ListOptions{ResourceVersion: list.ResourceVersion})
}

func (c *cluster) checkWatch(ctx context.Context, kw *kubectlWatch) error {
	// kubectl lists first, then watches: wait for its list (the ConfigMap
	// "settings" exists), so what follows reaches it as watch events.
	if err := kw.saw(ctx, 30*time.Second, "ADDED", "settings"); err != nil {
		return err
	}
	cms := c.client.CoreV1().ConfigMaps(harnessNS)
	w, err := c.watchConfigMaps(ctx)
	if err != nil {
		return err
	}
	defer w.Stop()
	cm, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "watched"}}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	cm.Data = map[string]string{"x": "y"}
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return err
	}
	if err := cms.Delete(ctx, "watched", metav1.DeleteOptions{}); err != nil {
		return err
	}
	want := []watch.EventType{watch.Added, watch.Modified, watch.Deleted}
	for i, typ := range want {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				return errors.New("watch closed")
			}
			obj, isCM := ev.Object.(*corev1.ConfigMap)
			if ev.Type != typ || !isCM || obj.Name != "watched" {
				return fmt.Errorf("event %d: %s %T, want %s of configmap watched", i, ev.Type, ev.Object, typ)
			}
		case <-time.After(30 * time.Second):
			return fmt.Errorf("event %d (%s) not delivered within 30 s", i, typ)
		}
	}
	if err := kw.saw(ctx, 30*time.Second, "ADDED", "watched"); err != nil {
		return err
	}
	return kw.saw(ctx, 30*time.Second, "DELETED", "watched")
}

// checkConsistentListFromCache lists configmaps with no resourceVersion (a
// consistent read) and checks, in kube-apiserver's own metrics, that the
// watch cache served them: that needs the storage server's progress
// notifications on request (WatchProgressRequest).
func (c *cluster) checkConsistentListFromCache(ctx context.Context) error {
	const series = `apiserver_watch_cache_consistent_read_total{fallback="false",group="",resource="configmaps",success="true"}`
	before, err := c.apiMetric(series)
	if err != nil {
		return err
	}
	for i := 0; i < 5; i++ {
		if _, err := c.client.CoreV1().ConfigMaps(harnessNS).List(ctx, metav1.ListOptions{}); err != nil {
			return err
		}
	}
	after, err := c.apiMetric(series)
	if err != nil {
		return err
	}
	if after-before < 5 {
		fallback, _ := c.apiMetric(`apiserver_watch_cache_consistent_read_total{fallback="true",group="",resource="configmaps",success="true"}`)
		return fmt.Errorf("%s rose by %v for 5 lists (fallback reads: %v)", series, after-before, fallback)
	}
	return nil
}

// checkEventTTL creates an Event and waits for it to disappear: kube-apiserver
// stores events under a lease with the event TTL, and only the storage
// server's lease expiry removes them.
func (c *cluster) checkEventTTL(ctx context.Context) error {
	ev := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: "expiring"},
		InvolvedObject: corev1.ObjectReference{Kind: "ConfigMap", Namespace: harnessNS, Name: "settings"},
		Reason:         "HarnessCheck", Message: "expires with its lease", Type: corev1.EventTypeNormal,
		FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
	}
	if _, err := c.client.CoreV1().Events(harnessNS).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		return err
	}
	cli, err := c.etcdClient()
	if err != nil {
		return err
	}
	defer cli.Close()
	resp, err := cli.Get(ctx, "/registry/events/"+harnessNS+"/expiring")
	if err != nil {
		return err
	}
	if len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		return fmt.Errorf("the event's key in storage: %v (want one key with a lease)", resp.Kvs)
	}
	ttl, err := cli.TimeToLive(ctx, clientv3.LeaseID(resp.Kvs[0].Lease))
	if err != nil {
		return err
	}
	limit := time.Duration(ttl.TTL)*time.Second + 30*time.Second
	return waitFor(ctx, fmt.Sprintf("event gone after its lease (TTL %d s) expired", ttl.TTL), limit, func() error {
		_, err := c.client.CoreV1().Events(harnessNS).Get(ctx, "expiring", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err == nil {
			err = errors.New("still there")
		}
		return err
	})
}

// checkGarbageCollection deletes the Deployment in the foreground: the garbage
// collector must delete its ReplicaSet and pods first. A ConfigMap owned by
// another goes with its owner in the background.
func (c *cluster) checkGarbageCollection(ctx context.Context) error {
	cms := c.client.CoreV1().ConfigMaps(harnessNS)
	owner, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "owner"}}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	dependent := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "dependent", OwnerReferences: []metav1.OwnerReference{{
		APIVersion: "v1", Kind: "ConfigMap", Name: owner.Name, UID: owner.UID,
	}}}}
	if _, err := cms.Create(ctx, dependent, metav1.CreateOptions{}); err != nil {
		return err
	}
	if err := cms.Delete(ctx, "owner", metav1.DeleteOptions{PropagationPolicy: ptr.To(metav1.DeletePropagationBackground)}); err != nil {
		return err
	}
	fg := metav1.DeletePropagationForeground
	if err := c.client.AppsV1().Deployments(harnessNS).Delete(ctx, "web", metav1.DeleteOptions{PropagationPolicy: &fg}); err != nil {
		return err
	}
	return waitFor(ctx, "Deployment, ReplicaSet, pods and the dependent ConfigMap collected", 3*time.Minute, func() error {
		if _, err := c.client.AppsV1().Deployments(harnessNS).Get(ctx, "web", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			return fmt.Errorf("deployment still there (%v)", err)
		}
		rss, err := c.client.AppsV1().ReplicaSets(harnessNS).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil || len(rss.Items) > 0 {
			return fmt.Errorf("replicasets left: %v", err)
		}
		pods, err := c.client.CoreV1().Pods(harnessNS).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil || len(pods.Items) > 0 {
			return fmt.Errorf("pods left: %v", err)
		}
		if _, err := cms.Get(ctx, "dependent", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			return fmt.Errorf("dependent configmap still there (%v)", err)
		}
		return nil
	})
}

// checkCompaction waits for kube-apiserver's compactor: it records its
// compaction in the key compact_rev_key (whose version counts the rounds) and
// compacts storage, so an old revision must be gone.
func (c *cluster) checkCompaction(ctx context.Context) error {
	cli, err := c.etcdClient()
	if err != nil {
		return err
	}
	defer cli.Close()
	return waitFor(ctx, "compaction driven by kube-apiserver", 4*c.opts.compaction+time.Minute, func() error {
		resp, err := cli.Get(ctx, "compact_rev_key")
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 || resp.Kvs[0].Version < 3 {
			return errors.New("compact_rev_key not yet written three times")
		}
		_, err = cli.Get(ctx, "/registry/health", clientv3.WithRev(2))
		if !errors.Is(err, rpctypes.ErrCompacted) {
			return fmt.Errorf("get at revision 2: want %v, got %v", rpctypes.ErrCompacted, err)
		}
		return nil
	})
}

// watchCacheInitializations reads, per resource, how often kube-apiserver's
// watch cache (re)initialised: each is a relist from storage.
func (c *cluster) watchCacheInitializations() (map[string]float64, error) {
	text, err := httpsGet(c.pki, c.apiURL+"/metrics")
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, "apiserver_watch_cache_initializations_total{") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, _ := strconv.ParseFloat(line[i+1:], 64)
		out[line[:i]] = v
	}
	return out, nil
}

// checkStorageRestart restarts the storage server under the running control
// plane. kube-apiserver must recover by itself, watches through it must go on
// (a client-go watch and the kubectl watch), and no resource's watch cache may
// relist more than once.
func (c *cluster) checkStorageRestart(ctx context.Context, kw *kubectlWatch) error {
	before, err := c.watchCacheInitializations()
	if err != nil {
		return err
	}
	cms := c.client.CoreV1().ConfigMaps(harnessNS)
	w, err := c.watchConfigMaps(ctx)
	if err != nil {
		return err
	}
	defer w.Stop()
	t0 := time.Now()
	if err := c.restartStorage(ctx); err != nil {
		return err
	}
	restarted := time.Since(t0)
	if err := waitFor(ctx, "kube-apiserver ready again", 2*time.Minute, func() error {
		_, err := httpsGet(c.pki, c.apiURL+"/readyz")
		return err
	}); err != nil {
		return err
	}
	if err := waitFor(ctx, "create after the restart", time.Minute, func() error {
		_, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "after-restart"}}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return nil
		}
		return err
	}); err != nil {
		return err
	}
	deadline := time.After(60 * time.Second)
	for delivered := false; !delivered; {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				return errors.New("the client-go watch was closed by the restart")
			}
			if cm, isCM := ev.Object.(*corev1.ConfigMap); isCM && ev.Type == watch.Added && cm.Name == "after-restart" {
				delivered = true
			}
		case <-deadline:
			return errors.New("the watch started before the restart got no event for a create after it")
		}
	}
	if err := kw.saw(ctx, 60*time.Second, "ADDED", "after-restart"); err != nil {
		return err
	}
	// Let the watch caches settle, then count relists.
	time.Sleep(5 * time.Second)
	after, err := c.watchCacheInitializations()
	if err != nil {
		return err
	}
	var over []string
	relisted := 0
	for series, v := range after {
		d := v - before[series]
		if d > 0 {
			relisted++
		}
		if d > 1 {
			over = append(over, fmt.Sprintf("%s +%v", series, d))
		}
	}
	logf("storage restarted in %s; %d watch caches relisted once", restarted.Round(time.Millisecond), relisted)
	if len(over) > 0 {
		return fmt.Errorf("watch caches relisted more than once: %s", strings.Join(over, "; "))
	}
	return nil
}

// checkCacheConsistency reads kube-apiserver's own verdict of its periodic
// comparisons of watch cache and storage: none may be inconsistent.
func (c *cluster) checkCacheConsistency(ctx context.Context) error {
	text, err := httpsGet(c.pki, c.apiURL+"/metrics")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "apiserver_storage_consistency_checks_total{") && strings.Contains(line, `status="inconsistent"`) && !strings.HasSuffix(line, " 0") {
			return fmt.Errorf("kube-apiserver found its watch cache inconsistent with storage: %s", line)
		}
	}
	return nil
}

// apiMetric reads one series of kube-apiserver's /metrics (0 when absent).
func (c *cluster) apiMetric(series string) (float64, error) {
	text, err := httpsGet(c.pki, c.apiURL+"/metrics")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, series+" ") {
			return strconv.ParseFloat(strings.TrimSpace(line[len(series):]), 64)
		}
	}
	return 0, nil
}

// checkRoutedEvents (with -route-events) looks below the one endpoint
// kube-apiserver uses: Events must sit in the events keyspace (read on that
// keyspace's own listener, with their leases), nothing else may, and
// kube-apiserver's compaction of the main keyspace must have reached the
// events keyspace too.
func (c *cluster) checkRoutedEvents(ctx context.Context) error {
	ev := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: "routed"},
		InvolvedObject: corev1.ObjectReference{Kind: "ConfigMap", Namespace: harnessNS, Name: "settings"},
		Reason:         "HarnessCheck", Message: "lands in the events keyspace", Type: corev1.EventTypeNormal,
		FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
	}
	if _, err := c.client.CoreV1().Events(harnessNS).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		return err
	}
	events, err := c.etcdClientAt(c.eventsURL)
	if err != nil {
		return err
	}
	defer events.Close()
	resp, err := events.Get(ctx, "/registry/events/"+harnessNS+"/routed")
	if err != nil {
		return err
	}
	if len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		return fmt.Errorf("the event in the events keyspace: %v (want one key with a lease)", resp.Kvs)
	}
	all, err := events.Get(ctx, "\x00", clientv3.WithFromKey(), clientv3.WithKeysOnly())
	if err != nil {
		return err
	}
	for _, kv := range all.Kvs {
		if !strings.HasPrefix(string(kv.Key), "/registry/events/") {
			return fmt.Errorf("key %q in the events keyspace", kv.Key)
		}
	}
	main, err := c.etcdClient()
	if err != nil {
		return err
	}
	defer main.Close()
	spanning, err := main.Get(ctx, "/registry/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err == nil || !strings.Contains(err.Error(), "spans keyspaces") {
		return fmt.Errorf("a range over both keyspaces through the routed endpoint: want InvalidArgument, got %v (%v)", err, spanning)
	}
	return waitFor(ctx, "compaction of the events keyspace", 4*c.opts.compaction+time.Minute, func() error {
		_, err := events.Get(ctx, "/registry/events/", clientv3.WithPrefix(), clientv3.WithRev(2))
		if !errors.Is(err, rpctypes.ErrCompacted) {
			return fmt.Errorf("events keyspace, get at revision 2: want %v, got %v", rpctypes.ErrCompacted, err)
		}
		return nil
	})
}
