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
//	ferretdb-testserver -listen 127.0.0.1:27017 -data-dir /tmp/ferret [-log-level info] [-exit-with-parent] [-serialize-writes=false]
//
// The process logs to stderr and shuts down cleanly on SIGTERM or SIGINT.
//
// Write serialization (on by default, -serialize-writes=false turns it off):
// FerretDB 1.24 implements update, findAndModify and friends as "read the
// documents, change them in Go, write them back by _id" without checking that
// nobody changed them in between. Concurrent $inc updates lose increments and
// two workers can both claim the same document with findAndModify, which real
// MongoDB never allows (single-document writes are atomic there). Tullius'
// tests exercise exactly those concurrency guarantees, so by default FerretDB
// listens on a private loopback port and this program relays every client
// connection to it, letting only one non-read-only command run at a time.
// Reads still run concurrently. The relay also drops the reply FerretDB sends
// to "moreToCome" (w=0) messages, which the client never reads and which
// would otherwise desynchronise the connection.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
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
	serializeWrites := flag.Bool("serialize-writes", true,
		"run one write command at a time, restoring MongoDB's single-document atomicity (see package doc)")
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

	backendAddr := *listen
	if *serializeWrites {
		backendAddr = "127.0.0.1:0" // private port; clients only reach it through the relay
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: backendAddr},
		Logger:    logger,
		Handler:   "sqlite",
		SQLiteURL: sqliteURL,
	})
	if err != nil {
		return fmt.Errorf("starting FerretDB on %s with SQLite URL %q: %w", backendAddr, sqliteURL, err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if *exitWithParent {
		ctx = watchParent(ctx, logger)
	}

	var relayDone <-chan struct{}
	if *serializeWrites {
		backendURI, err := url.Parse(f.MongoDBURI())
		if err != nil {
			return fmt.Errorf("FerretDB reported URI %q, expected a mongodb:// URI: %w", f.MongoDBURI(), err)
		}

		front, err := net.Listen("tcp", *listen)
		if err != nil {
			return fmt.Errorf("-listen %q: %w", *listen, err)
		}

		relayDone = serveRelay(ctx, front, backendURI.Host, logger)
	}

	// The harness waits for a successful ping rather than for this line, but
	// it makes the log readable when a test fails.
	logger.Info("ferretdb-testserver listening", "addr", *listen, "data_dir", *dataDir, "serialize_writes", *serializeWrites)

	// Run returns after ctx is cancelled, once the listener and all client
	// connections are closed and the SQLite databases have been closed.
	if err := f.Run(ctx); err != nil {
		return fmt.Errorf("FerretDB stopped with an error: %w", err)
	}

	if relayDone != nil {
		<-relayDone
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

// Wire protocol constants used by the relay.
const (
	opQuery         = 2004
	opMsg           = 2013
	msgMoreToCome   = 1 << 1
	headerLen       = 16
	maxMessageBytes = 64 << 20 // above MongoDB's 48 MB limit
)

// readOnlyCommands may run concurrently with anything; all other commands
// (including unknown ones) take the write lock. Keys are lower-cased.
var readOnlyCommands = map[string]bool{
	"find": true, "getmore": true, "count": true, "distinct": true, "aggregate": true,
	"killcursors": true, "hello": true, "ismaster": true, "ping": true, "buildinfo": true,
	"listcollections": true, "listindexes": true, "listdatabases": true, "serverstatus": true,
	"dbstats": true, "collstats": true, "datasize": true, "explain": true, "endsessions": true,
	"whatsmyuri": true, "getparameter": true, "getcmdlineopts": true, "getlog": true,
	"hostinfo": true, "connectionstatus": true, "saslstart": true, "saslcontinue": true,
	"listcommands": true, "getfreemonitoringstatus": true,
}

// serveRelay accepts client connections on front and relays each to the
// FerretDB backend at backendAddr. The returned channel is closed once ctx is
// done and every relayed connection has been closed.
func serveRelay(ctx context.Context, front net.Listener, backendAddr string, logger *slog.Logger) <-chan struct{} {
	var (
		writeLock sync.Mutex
		wg        sync.WaitGroup
		connsMu   sync.Mutex
		conns     = map[net.Conn]struct{}{}
		done      = make(chan struct{})
	)

	track := func(c net.Conn, add bool) {
		connsMu.Lock()
		defer connsMu.Unlock()

		if add {
			conns[c] = struct{}{}
		} else {
			delete(conns, c)
		}
	}

	go func() {
		<-ctx.Done()
		_ = front.Close()

		connsMu.Lock()
		for c := range conns {
			_ = c.Close()
		}
		connsMu.Unlock()

		wg.Wait()
		close(done)
	}()

	go func() {
		for {
			client, err := front.Accept()
			if err != nil {
				if ctx.Err() == nil {
					logger.Error("relay accept failed; no new connections will be served", "error", err)
				}

				return
			}

			backend, err := net.Dial("tcp", backendAddr)
			if err != nil {
				logger.Error("relay cannot reach FerretDB backend", "backend", backendAddr, "error", err)
				_ = client.Close()

				continue
			}

			track(client, true)
			track(backend, true)
			wg.Add(1)

			go func() {
				defer wg.Done()
				defer track(client, false)
				defer track(backend, false)

				err := relayConn(client, backend, &writeLock)
				if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
					logger.Debug("relay connection ended", "client", client.RemoteAddr().String(), "error", err)
				}
			}()
		}
	}()

	return done
}

// relayConn forwards requests one at a time and their replies back. MongoDB
// clients never pipeline requests on one connection, so a request/reply
// loop is enough and lets the write lock cover a whole command.
func relayConn(client, backend net.Conn, writeLock *sync.Mutex) error {
	defer client.Close()
	defer backend.Close()

	fromClient := bufio.NewReader(client)
	fromBackend := bufio.NewReader(backend)

	for {
		req, err := readMessage(fromClient)
		if err != nil {
			return err
		}

		exclusive, moreToCome := classify(req)

		if exclusive {
			writeLock.Lock()
		}

		var reply []byte
		if _, err = backend.Write(req); err == nil {
			// FerretDB 1.24 answers every request, even those flagged moreToCome.
			reply, err = readMessage(fromBackend)
		}

		if exclusive {
			writeLock.Unlock()
		}

		if err != nil {
			return err
		}

		if moreToCome {
			continue // the client does not expect this reply
		}

		if _, err = client.Write(reply); err != nil {
			return err
		}
	}
}

// readMessage reads one complete wire protocol message, header included.
func readMessage(r *bufio.Reader) ([]byte, error) {
	var header [headerLen]byte
	if _, err := io.ReadFull(r, header[:]); err != nil {
		return nil, err
	}

	n := int(int32(binary.LittleEndian.Uint32(header[:4])))
	if n < headerLen || n > maxMessageBytes {
		return nil, fmt.Errorf("wire message length %d is outside %d..%d", n, headerLen, maxMessageBytes)
	}

	msg := make([]byte, n)
	copy(msg, header[:])

	if _, err := io.ReadFull(r, msg[headerLen:]); err != nil {
		return nil, err
	}

	return msg, nil
}

// classify reports whether msg must hold the write lock, and whether the
// client expects no reply. Anything not recognised as a read is treated as a
// write: serializing too much is only slower, serializing too little is wrong.
func classify(msg []byte) (exclusive, moreToCome bool) {
	opCode := binary.LittleEndian.Uint32(msg[12:16])
	if opCode == opQuery {
		return false, false // legacy handshake (hello/isMaster) only
	}

	if opCode != opMsg || len(msg) < 21 {
		return true, false
	}

	flags := binary.LittleEndian.Uint32(msg[16:20])
	moreToCome = flags&msgMoreToCome != 0

	// Sections start after the flags; find the body (kind 0) and read the
	// name of its first element, which is the command name.
	for pos := 20; pos+5 < len(msg); {
		kind := msg[pos]
		size := int(int32(binary.LittleEndian.Uint32(msg[pos+1 : pos+5])))

		if kind == 0 {
			nameStart := pos + 6 // kind byte, document length, element type byte
			if nameStart >= len(msg) {
				return true, moreToCome
			}

			end := bytes.IndexByte(msg[nameStart:], 0)
			if end < 0 {
				return true, moreToCome
			}

			name := strings.ToLower(string(msg[nameStart : nameStart+end]))

			return !readOnlyCommands[name], moreToCome
		}

		if size <= 0 {
			break
		}

		pos += 1 + size
	}

	return true, moreToCome
}
