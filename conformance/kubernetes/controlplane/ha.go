package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// member is one of several pgetcd instances on one keyspace (-ha): its own
// name, client URL and process; the keyspace and its Postgres are shared.
type member struct {
	name string
	url  string // https, mutual TLS: the instances forward to each other with it too
	proc *proc
}

// haKeyspace is the keyspace the instances share.
const haKeyspace = "kubernetes"

// startMembers starts one throwaway Postgres and c.opts.instances pgetcd
// processes on it, each with its own name and ports, as docs/operations.md
// ("Several instances") says, over mutual TLS like the single pgetcd, and waits until each serves. The first one
// serves before the others start: started together on a fresh keyspace, all
// but one may exit ("preparing the change feed: prepare the replication
// slot"), as they race to create the keyspace's publication.
func (c *cluster) startMembers(ctx context.Context) error {
	pgURL, err := c.startPostgres()
	if err != nil {
		return err
	}
	var urls []string
	for i := 1; i <= c.opts.instances; i++ {
		name := "pgetcd-" + strconv.Itoa(i)
		url := "https://127.0.0.1:" + strconv.Itoa(freePort())
		metrics := "http://127.0.0.1:" + strconv.Itoa(freePort())
		m := &member{name: name, url: url}
		args := []string{c.opts.pgetcd,
			"--name", name,
			"--postgres-url", pgURL,
			"--keyspace", haKeyspace,
			"--listen-client-urls", url, "--advertise-client-urls", url,
			"--listen-metrics-urls", metrics,
			// One certificate for all: server and client use, 127.0.0.1.
			"--cert-file", c.pki.path("storage.crt"), "--key-file", c.pki.path("storage.key"),
			"--trusted-ca-file", c.pki.path("ca.crt"), "--client-cert-auth",
		}
		if c.opts.progressNotify > 0 {
			args = append(args, "--watch-progress-notify-interval", c.opts.progressNotify.String())
		}
		m.proc, err = startProc(c.opts.dir, name, args...)
		if err != nil {
			return err
		}
		c.members = append(c.members, m)
		urls = append(urls, url)
		if i == 1 {
			c.metricsURL = metrics + "/metrics"
			if err := c.waitMember(ctx, m); err != nil {
				return err
			}
		}
	}
	c.storageURL = strings.Join(urls, ",")
	for _, m := range c.members[1:] {
		if err := c.waitMember(ctx, m); err != nil {
			return err
		}
	}
	return nil
}

// waitMember waits until m answers a serializable read of its own.
func (c *cluster) waitMember(ctx context.Context, m *member) error {
	return waitFor(ctx, m.name+" serving", 60*time.Second, func() error {
		if !m.proc.running() {
			return fmt.Errorf("%s exited:\n%s", m.name, m.proc.tail(20))
		}
		cli, err := c.etcdClientAt(m.url)
		if err != nil {
			return err
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err = cli.Get(ctx, "/registry/health", clientv3.WithSerializable())
		return err
	})
}

// writer returns the instance that writes now: the first live instance whose
// Maintenance Status names itself as the leader. nil when none does (no
// writer, or none answers).
func (c *cluster) writer(ctx context.Context) *member {
	for _, m := range c.members {
		if !m.proc.running() {
			continue
		}
		if c.isWriter(ctx, m) {
			return m
		}
	}
	return nil
}

func (c *cluster) isWriter(ctx context.Context, m *member) bool {
	cli, err := c.etcdClientAt(m.url)
	if err != nil {
		return false
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	st, err := cli.Status(ctx, m.url)
	return err == nil && st.Leader != 0 && st.Header.MemberId == st.Leader
}
