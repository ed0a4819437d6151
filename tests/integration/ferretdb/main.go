// Command ferretdb-testserver runs an embedded FerretDB (SQLite backend) for
// Tullius' integration tests.
//
// Why a custom binary instead of a packaged MongoDB: the test machines can
// only reach language package registries, so a MongoDB server cannot be
// installed there, but FerretDB is a Go module that the Go module proxy
// serves. Embedding it with the pure-Go SQLite driver gives a MongoDB
// wire-protocol server without cgo or any system package.
//
// Usage:
//
//	ferretdb-testserver -listen 127.0.0.1:27017 -data-dir /tmp/ferret [-log-level info] [-exit-with-parent]
//
// The process logs to stderr and shuts down cleanly on SIGTERM or SIGINT.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "ferretdb-testserver: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP `host:port` to listen on (use a loopback address)")
	dataDir := flag.String("data-dir", "", "`directory` holding the SQLite files; created if missing (required)")
	logLevel := flag.String("log-level", "info", "log `level`: debug, info, warn or error")
	exitWithParent := flag.Bool("exit-with-parent", false,
		"shut down when the parent process goes away, so a crashed test run leaves no server behind")
	flag.Parse()

	if flag.NArg() != 0 {
		return fmt.Errorf("unexpected positional arguments %q; expected only flags", flag.Args())
	}

	if *dataDir == "" {
		return errors.New("-data-dir is required; expected a directory path for the SQLite files")
	}

	if _, _, err := net.SplitHostPort(*listen); err != nil {
		return fmt.Errorf("-listen %q is not a host:port address: %w", *listen, err)
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("-log-level %q: expected debug, info, warn or error: %w", *logLevel, err)
	}

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	sqliteURL, err := sqliteURLForDir(*dataDir)
	if err != nil {
		return err
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Logger:    logger,
		Handler:   "sqlite",
		SQLiteURL: sqliteURL,
	})
	if err != nil {
		return fmt.Errorf("starting FerretDB on %s with SQLite URL %q: %w", *listen, sqliteURL, err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if *exitWithParent {
		ctx = watchParent(ctx, logger)
	}

	// The harness waits for a successful ping rather than for this line, but
	// it makes the log readable when a test fails.
	logger.Info("ferretdb-testserver listening", "uri", f.MongoDBURI(), "data_dir", *dataDir)

	// Run returns after ctx is cancelled, once the listener and all client
	// connections are closed and the SQLite databases have been closed.
	if err := f.Run(ctx); err != nil {
		return fmt.Errorf("FerretDB stopped with an error: %w", err)
	}

	logger.Info("ferretdb-testserver stopped")

	return nil
}

// sqliteURLForDir creates dir if needed and turns it into the "file:" URI that
// FerretDB's SQLite handler expects: absolute, pointing at an existing
// directory and ending with a slash.
func sqliteURLForDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("-data-dir %q cannot be made absolute: %w", dir, err)
	}

	if err := os.MkdirAll(abs, 0o755); err != nil {
		return "", fmt.Errorf("-data-dir %q cannot be created: %w", abs, err)
	}

	p := filepath.ToSlash(abs)
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}

	// url.URL escapes characters such as '?', '#' and spaces that would
	// otherwise be read as part of the query or fragment.
	u := url.URL{Scheme: "file", Path: p}

	return u.String(), nil
}

// watchParent returns a context that is also cancelled when this process is
// re-parented, which happens when the process that started it has died.
// Polling keeps this portable and independent of which OS thread started us.
func watchParent(parent context.Context, logger *slog.Logger) context.Context {
	ctx, cancel := context.WithCancel(parent)
	original := os.Getppid()

	go func() {
		ticker := time.NewTicker(500 * time.Millisecond)
		defer ticker.Stop()

		for {
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
				if now := os.Getppid(); now != original {
					logger.Warn("parent process went away; shutting down", "old_ppid", original, "new_ppid", now)
					cancel()

					return
				}
			}
		}
	}()

	return ctx
}
