// Command benchreport reads the JSON reports of `controlplane -bench` runs and
// prints a Markdown table per backend: the median over runs of each figure,
// the runs' values beside it, and each backend's ratio to etcd. With -plots DIR
// it also writes SVG bar charts of the main figures there.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

type quantiles struct {
	P50 float64 `json:"p50_ms"`
	P99 float64 `json:"p99_ms"`
}

type report struct {
	Backend string `json:"backend"`
	Nodes   int    `json:"nodes"`
	Jobs    []struct {
		Name    string  `json:"name"`
		Seconds float64 `json:"seconds"`
	} `json:"jobs"`
	PodScheduled      quantiles            `json:"pod_scheduled"`
	PodRunning        quantiles            `json:"pod_running"`
	ListFull          quantiles            `json:"list_full"`
	ListPaged         quantiles            `json:"list_paged"`
	Requests          map[string]quantiles `json:"apiserver_requests"`
	Storage           map[string]quantiles `json:"etcd_requests"`
	StorageCPUSeconds float64              `json:"storage_cpu_seconds"`
	StoragePeakPSS    float64              `json:"storage_peak_pss_bytes"`
	StorageDiskBytes  float64              `json:"storage_disk_bytes"`
}

// row is one figure: how to read it from a report, and its unit.
type row struct {
	name, unit string
	get        func(r *report) (float64, bool)
}

func job(name string) func(r *report) (float64, bool) {
	return func(r *report) (float64, bool) {
		for _, j := range r.Jobs {
			if j.Name == name {
				return j.Seconds, true
			}
		}
		return 0, false
	}
}

func request(m func(r *report) map[string]quantiles, key string, p99 bool) func(r *report) (float64, bool) {
	return func(r *report) (float64, bool) {
		q, ok := m(r)[key]
		if !ok {
			return 0, false
		}
		if p99 {
			return q.P99, !math.IsNaN(q.P99)
		}
		return q.P50, !math.IsNaN(q.P50)
	}
}

func rows(reports []*report) []row {
	out := []row{}
	for _, j := range []string{"nodes", "cluster-density", "node-density", "churn-1", "churn-2", "list-objects"} {
		out = append(out, row{"job " + j, "s", job(j)})
	}
	q := func(name string, f func(r *report) quantiles) {
		out = append(out,
			row{name + " p50", "ms", func(r *report) (float64, bool) { return f(r).P50, f(r).P50 > 0 }},
			row{name + " p99", "ms", func(r *report) (float64, bool) { return f(r).P99, f(r).P99 > 0 }})
	}
	q("pod scheduled", func(r *report) quantiles { return r.PodScheduled })
	q("pod running", func(r *report) quantiles { return r.PodRunning })
	q("client LIST full", func(r *report) quantiles { return r.ListFull })
	q("client LIST paged", func(r *report) quantiles { return r.ListPaged })
	reqs := func(r *report) map[string]quantiles { return r.Requests }
	stor := func(r *report) map[string]quantiles { return r.Storage }
	keys := func(m func(r *report) map[string]quantiles) []string {
		seen := map[string]bool{}
		for _, r := range reports {
			for k := range m(r) {
				seen[k] = true
			}
		}
		var ks []string
		for k := range seen {
			ks = append(ks, k)
		}
		sort.Strings(ks)
		return ks
	}
	for _, k := range keys(reqs) {
		verb, resource, _ := strings.Cut(k, " ")
		if resource != "*" && !interesting[resource] {
			continue
		}
		if verb == "WATCH" || verb == "CONNECT" {
			continue
		}
		out = append(out,
			row{"apiserver " + k + " p50", "ms", request(reqs, k, false)},
			row{"apiserver " + k + " p99", "ms", request(reqs, k, true)})
	}
	for _, k := range keys(stor) {
		op, _, _ := strings.Cut(k, " ")
		if !strings.HasSuffix(k, " *") {
			continue
		}
		out = append(out,
			row{"storage " + op + " p50", "ms", request(stor, k, false)},
			row{"storage " + op + " p99", "ms", request(stor, k, true)})
	}
	out = append(out,
		row{"storage CPU", "s", func(r *report) (float64, bool) { return r.StorageCPUSeconds, true }},
		row{"storage peak PSS", "MiB", func(r *report) (float64, bool) { return r.StoragePeakPSS / (1 << 20), true }},
		row{"storage on disk", "MiB", func(r *report) (float64, bool) { return r.StorageDiskBytes / (1 << 20), true }},
	)
	return out
}

// The resources whose per-resource rows the table shows (the rest are in the
// "VERB *" rows).
var interesting = map[string]bool{"pods": true, "podtemplates": true, "configmaps": true, "nodes": true, "leases": true}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s) == 0 {
		return math.NaN()
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func format(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func main() {
	plots := flag.String("plots", "", "directory for SVG plots")
	flag.Parse()
	byBackend := map[string][]*report{}
	var all []*report
	for _, path := range flag.Args() {
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		r := &report{}
		if err := json.Unmarshal(data, r); err != nil {
			fmt.Fprintln(os.Stderr, path, err)
			os.Exit(1)
		}
		byBackend[r.Backend] = append(byBackend[r.Backend], r)
		all = append(all, r)
	}
	order := []string{}
	for _, b := range []string{"etcd", "pgetcd", "kine"} {
		if len(byBackend[b]) > 0 {
			order = append(order, b)
		}
	}
	fmt.Printf("| figure | %s |", strings.Join(order, " | "))
	for _, b := range order[1:] {
		fmt.Printf(" %s / etcd |", b)
	}
	fmt.Println()
	fmt.Println("|---" + strings.Repeat("|---", len(order)*2-1) + "|")
	medians := map[string]map[string]float64{}
	for _, rw := range rows(all) {
		values := map[string]float64{}
		cells := []string{}
		for _, b := range order {
			var xs []float64
			for _, r := range byBackend[b] {
				if v, ok := rw.get(r); ok {
					xs = append(xs, v)
				}
			}
			m := median(xs)
			values[b] = m
			runs := make([]string, len(xs))
			for i, x := range xs {
				runs[i] = format(x)
			}
			cells = append(cells, fmt.Sprintf("%s (%s)", format(m), strings.Join(runs, ", ")))
		}
		medians[rw.name] = values
		fmt.Printf("| %s (%s) | %s |", rw.name, rw.unit, strings.Join(cells, " | "))
		for _, b := range order[1:] {
			fmt.Printf(" %s |", format(values[b]/values["etcd"]))
		}
		fmt.Println()
	}
	if *plots != "" {
		if err := writePlots(*plots, order, medians); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}

// writePlots draws grouped bars (one group per figure, one bar per backend)
// for the request latency p99s and for the job durations.
func writePlots(dir string, backends []string, medians map[string]map[string]float64) error {
	charts := map[string][]string{
		"k8s-bench-latency-p99.svg": {"apiserver POST pods p99", "apiserver POST configmaps p99", "apiserver PUT * p99", "apiserver PATCH * p99", "apiserver DELETE * p99", "apiserver LIST pods p99", "apiserver LIST podtemplates p99", "client LIST full p99"},
		"k8s-bench-jobs.svg":        {"job nodes", "job cluster-density", "job node-density", "job churn-1", "job churn-2", "job list-objects"},
	}
	colors := map[string]string{"etcd": "#4e79a7", "pgetcd": "#59a14f", "kine": "#e15759"}
	for file, figures := range charts {
		var b strings.Builder
		const w, h, left, top, bottom = 760, 320, 60, 30, 90
		max := 0.0
		for _, f := range figures {
			for _, be := range backends {
				if v := medians[f][be]; !math.IsNaN(v) && v > max {
					max = v
				}
			}
		}
		if max == 0 {
			continue
		}
		fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", w, h)
		fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", w, h)
		plotH := float64(h - top - bottom)
		group := float64(w-left-10) / float64(len(figures))
		bar := group * 0.8 / float64(len(backends))
		for i, f := range figures {
			x0 := float64(left) + group*float64(i) + group*0.1
			for j, be := range backends {
				v := medians[f][be]
				if math.IsNaN(v) {
					continue
				}
				bh := plotH * v / max
				x := x0 + bar*float64(j)
				fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", x, float64(top)+plotH-bh, bar-1, bh, colors[be])
				fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle" font-size="9">%s</text>`+"\n", x+bar/2, float64(top)+plotH-bh-2, format(v))
			}
			label := strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(f, "apiserver "), "job "), " p99")
			fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="end" transform="rotate(-30 %.1f %d)">%s</text>`+"\n", x0+group*0.4, h-bottom+14, x0+group*0.4, h-bottom+14, label)
		}
		unit := "ms (p99, median of runs)"
		if strings.Contains(file, "jobs") {
			unit = "seconds (median of runs)"
		}
		fmt.Fprintf(&b, `<text x="%d" y="18">%s</text>`+"\n", left, unit)
		for j, be := range backends {
			fmt.Fprintf(&b, `<rect x="%d" y="8" width="10" height="10" fill="%s"/><text x="%d" y="17">%s</text>`+"\n", w-220+j*70, colors[be], w-206+j*70, be)
		}
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="black"/>`+"\n", left, float64(top)+plotH, w-10, float64(top)+plotH)
		b.WriteString("</svg>\n")
		if err := os.WriteFile(filepath.Join(dir, file), []byte(b.String()), 0o644); err != nil {
			return err
		}
	}
	return nil
}
