package main

import (
	"math"
	"sort"
	"strconv"
	"strings"
)

// histograms holds cumulative bucket counts of kube-apiserver's request
// latency histograms, keyed by series name and then by label key.
type histograms map[string]map[string]*histogram

type histogram struct {
	bounds []float64 // upper bounds, ascending, +Inf last
	counts []float64 // cumulative counts, as exposed
}

// histQuantiles is what the reports keep of one histogram, in milliseconds,
// interpolated within buckets as Prometheus's histogram_quantile does.
type histQuantiles struct {
	Count float64 `json:"count"`
	P50   float64 `json:"p50_ms"`
	P99   float64 `json:"p99_ms"`
}

// The series of kube-apiserver read, and the labels that make their keys.
var histogramKeys = map[string][]string{
	"apiserver_request_duration_seconds": {"verb", "resource"},
	"etcd_request_duration_seconds":      {"operation", "resource"},
}

func (c *cluster) apiHistograms() (histograms, error) {
	text, err := httpsGet(c.pki, c.apiURL+"/metrics")
	if err != nil {
		return nil, err
	}
	return parseHistograms(text, histogramKeys), nil
}

// parseHistograms reads the histograms named in keys (series name to the
// labels that make a key) from a /metrics text.
func parseHistograms(text string, histogramKeys map[string][]string) histograms {
	out := histograms{}
	for _, line := range strings.Split(text, "\n") {
		name, rest, ok := strings.Cut(line, "_bucket{")
		if !ok {
			continue
		}
		keys, wanted := histogramKeys[name]
		if !wanted {
			continue
		}
		end := strings.LastIndex(rest, "} ")
		if end < 0 {
			continue
		}
		labels := parseLabels(rest[:end])
		value, err := strconv.ParseFloat(strings.TrimSpace(rest[end+2:]), 64)
		if err != nil {
			continue
		}
		le, err := strconv.ParseFloat(labels["le"], 64)
		if err != nil {
			continue
		}
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = labels[k]
		}
		key := strings.Join(parts, " ")
		if out[name] == nil {
			out[name] = map[string]*histogram{}
		}
		h := out[name][key]
		if h == nil {
			h = &histogram{}
			out[name][key] = h
		}
		// Several series can share a key (other labels differ): add them up.
		i := sort.SearchFloat64s(h.bounds, le)
		if i < len(h.bounds) && h.bounds[i] == le {
			h.counts[i] += value
			continue
		}
		h.bounds = append(h.bounds, 0)
		h.counts = append(h.counts, 0)
		copy(h.bounds[i+1:], h.bounds[i:])
		copy(h.counts[i+1:], h.counts[i:])
		h.bounds[i], h.counts[i] = le, value
	}
	return out
}

func parseLabels(s string) map[string]string {
	labels := map[string]string{}
	for len(s) > 0 {
		k, rest, ok := strings.Cut(s, `="`)
		if !ok {
			break
		}
		v, rest, _ := strings.Cut(rest, `"`)
		labels[strings.TrimPrefix(k, ",")] = v
		s = strings.TrimPrefix(rest, ",")
	}
	return labels
}

// since returns the quantiles of what was observed between before and h, for
// the apiserver's requests and its storage requests. Per verb it also adds a
// "VERB *" row over every resource.
func (h histograms) since(before histograms) (requests, storage map[string]histQuantiles) {
	delta := func(name string, all bool) map[string]histQuantiles {
		out := map[string]histQuantiles{}
		sums := map[string]*histogram{}
		for key, now := range h[name] {
			d := now.minus(before[name][key])
			if d.total() == 0 {
				continue
			}
			out[key] = d.quantiles()
			if all {
				verb, _, _ := strings.Cut(key, " ")
				s := sums[verb]
				if s == nil {
					s = &histogram{bounds: d.bounds, counts: make([]float64, len(d.counts))}
					sums[verb] = s
				}
				if len(s.counts) == len(d.counts) {
					for i := range d.counts {
						s.counts[i] += d.counts[i]
					}
				}
			}
		}
		for verb, s := range sums {
			out[verb+" *"] = s.quantiles()
		}
		return out
	}
	return delta("apiserver_request_duration_seconds", true), delta("etcd_request_duration_seconds", true)
}

// minus is what was observed after old (nil: since the start).
func (h *histogram) minus(old *histogram) *histogram {
	d := &histogram{bounds: h.bounds, counts: make([]float64, len(h.counts))}
	copy(d.counts, h.counts)
	if old != nil && len(old.counts) == len(d.counts) {
		for i := range d.counts {
			d.counts[i] -= old.counts[i]
		}
	}
	return d
}

// between returns the quantiles of series name at key observed between before
// and h (a zero count when nothing was).
func (h histograms) between(before histograms, name, key string) histQuantiles {
	now := h[name][key]
	if now == nil {
		return histQuantiles{}
	}
	d := now.minus(before[name][key])
	if d.total() == 0 {
		return histQuantiles{}
	}
	return d.quantiles()
}

func (h *histogram) total() float64 {
	if len(h.counts) == 0 {
		return 0
	}
	return h.counts[len(h.counts)-1]
}

func (h *histogram) quantiles() histQuantiles {
	return histQuantiles{Count: h.total(), P50: h.quantile(0.5) * 1000, P99: h.quantile(0.99) * 1000}
}

// quantile interpolates linearly within the bucket that holds rank q, and
// answers the highest finite bound for ranks in the +Inf bucket.
func (h *histogram) quantile(q float64) float64 {
	total := h.total()
	if total == 0 {
		return math.NaN()
	}
	rank := q * total
	lower, below := 0.0, 0.0
	for i, bound := range h.bounds {
		if h.counts[i] >= rank {
			if math.IsInf(bound, 1) {
				return lower
			}
			inBucket := h.counts[i] - below
			if inBucket <= 0 {
				return bound
			}
			return lower + (bound-lower)*(rank-below)/inBucket
		}
		lower, below = bound, h.counts[i]
	}
	return lower
}
