module retryq-go-transport

go 1.19
