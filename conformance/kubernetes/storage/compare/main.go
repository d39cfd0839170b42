// Command compare reads the go test -json output of the storage suites run on
// etcd and on pgetcd and checks the one rule of the conformance run: every test
// that passes on etcd passes on pgetcd, unless exceptions.txt names it with a
// reason. It prints the pass counts per suite and every difference, and exits 1
// when a test passes on etcd but not on pgetcd without an exception, or when an
// exception no longer applies (so the list stays true).
//
// Usage: compare -exceptions FILE ETCD.json PGETCD.json [ETCD.json PGETCD.json ...]
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
)

type event struct {
	Action  string
	Package string
	Test    string
}

// results maps a top-level test name (subtests are part of their parent's
// result) to its final action: pass, fail or skip.
func results(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	res := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) != nil || e.Test == "" || strings.Contains(e.Test, "/") {
			continue
		}
		switch e.Action {
		case "pass", "fail", "skip":
			res[e.Test] = e.Action
		case "run":
			if _, ok := res[e.Test]; !ok {
				res[e.Test] = "incomplete"
			}
		}
	}
	return res, sc.Err()
}

// exceptions reads "Suite TestName reason..." lines; # starts a comment.
func exceptions(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	ex := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return nil, fmt.Errorf("%s: %q: want SUITE TEST REASON", path, line)
		}
		ex[f[0]+" "+f[1]] = strings.Join(f[2:], " ")
	}
	return ex, nil
}

func suiteName(path string) string {
	base := path[strings.LastIndex(path, "/")+1:]
	return strings.SplitN(base, ".", 2)[0]
}

func main() {
	exFile := flag.String("exceptions", "", "file of tests allowed to fail on pgetcd only")
	flag.Parse()
	args := flag.Args()
	if len(args) == 0 || len(args)%2 != 0 {
		fmt.Fprintln(os.Stderr, "usage: compare -exceptions FILE ETCD.json PGETCD.json ...")
		os.Exit(2)
	}
	ex := map[string]string{}
	if *exFile != "" {
		var err error
		if ex, err = exceptions(*exFile); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
	}
	used, seen := map[string]bool{}, map[string]bool{}
	bad := 0
	for i := 0; i < len(args); i += 2 {
		suite := suiteName(args[i])
		etcd, err1 := results(args[i])
		ours, err2 := results(args[i+1])
		if err1 != nil || err2 != nil {
			fmt.Fprintln(os.Stderr, err1, err2)
			os.Exit(2)
		}
		names := make([]string, 0, len(etcd))
		for name := range etcd {
			names = append(names, name)
		}
		for name := range ours {
			if _, ok := etcd[name]; !ok {
				names = append(names, name)
			}
		}
		sort.Strings(names)
		count := func(res map[string]string, action string) int {
			n := 0
			for _, a := range res {
				if a == action {
					n++
				}
			}
			return n
		}
		fmt.Printf("%s: %d tests; etcd %d passed, %d failed, %d skipped; pgetcd %d passed, %d failed, %d skipped\n",
			suite, len(names), count(etcd, "pass"), count(etcd, "fail"), count(etcd, "skip"),
			count(ours, "pass"), count(ours, "fail"), count(ours, "skip"))
		for _, name := range names {
			key := suite + " " + name
			seen[key] = true
			e, o := etcd[name], ours[name]
			if e == o {
				continue
			}
			switch {
			case e == "pass" && ex[key] != "":
				used[key] = true
				fmt.Printf("  excepted  %-60s etcd %s, pgetcd %s: %s\n", name, e, o, ex[key])
			case e == "pass":
				bad++
				fmt.Printf("  REGRESSED %-60s etcd %s, pgetcd %s\n", name, e, o)
			default:
				fmt.Printf("  differs   %-60s etcd %s, pgetcd %s\n", name, e, o)
			}
		}
	}
	for key, reason := range ex {
		if seen[key] && !used[key] {
			bad++
			fmt.Printf("  STALE exception %s (%s): it no longer fails on pgetcd only\n", key, reason)
		}
	}
	if bad > 0 {
		fmt.Printf("%d failed, conformance broken\n", bad)
		os.Exit(1)
	}
	fmt.Println("every test that passes on etcd passes on pgetcd")
}
