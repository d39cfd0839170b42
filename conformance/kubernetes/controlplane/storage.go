package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdClient connects to the storage server with the apiserver's client
// certificate, for checks that look below the apiserver.
func (c *cluster) etcdClient() (*clientv3.Client, error) {
	return c.etcdClientAt(strings.Split(c.storageURL, ",")...)
}

// etcdClientAt connects to the given endpoints: over mutual TLS with the
// apiserver's client certificate to https ones, plainly to http ones.
func (c *cluster) etcdClientAt(endpoints ...string) (*clientv3.Client, error) {
	if !strings.HasPrefix(endpoints[0], "https://") {
		return clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	}
	cert, err := tls.LoadX509KeyPair(c.pki.path("apiserver-etcd-client.crt"), c.pki.path("apiserver-etcd-client.key"))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(c.pki.path("ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		TLS:         &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool},
		Logger:      zap.NewNop(),
	})
}

// storageHealthy does what kube-apiserver's etcd health check does: a Get
// with a 2 s timeout.
func (c *cluster) storageHealthy(ctx context.Context) error {
	cli, err := c.etcdClient()
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := cli.Get(ctx, "/registry/health"); err != nil {
		return fmt.Errorf("get /registry/health: %w", err)
	}
	return nil
}
